"""Every method's prefill->decode payload: exactly its transfer bytes, and the installed store attends as the
sender's did (HACK's quantized pages travel and are installed as they are)."""
import pytest
import torch

from hack_cli.hf import make_method
from hack_cli.serve.link import pack_payload, unpack_payload

H, D = 2, 64

CASES = [("fp16", {}), ("hack", {}), ("hack", {"layout": "token", "sink_tokens": 0}),
         ("hack", {"send_sums": False}), ("hack", {"requant_elimination": False}),
         ("kivi", {}), ("cachegen", {}), ("fp8", {})]


@pytest.mark.parametrize("name,fields", CASES)
@pytest.mark.parametrize("tokens", [200, 256 + 4])
def test_payload_roundtrip(name, fields, tokens):
    torch.manual_seed(0)
    method = make_method(name, **fields)
    src = method.new_layer(0, 2, 1, H, D, "cpu", torch.float32)
    src.append(torch.randn(1, H, tokens, D), torch.randn(1, H, tokens, D))
    payload = src.export_seq(0)
    buf, manifest = pack_payload([payload])
    assert buf.numel() == src.transfer_bytes().total
    dst = method.new_layer(0, 2, 1, H, D, "cpu", torch.float32)
    dst.import_seq(0, unpack_payload(buf, manifest, 1)[0])
    assert int(dst.lengths[0]) == tokens
    step_k, step_v = torch.randn(1, H, 1, D), torch.randn(1, H, 1, D)
    q = torch.randn(1, 2 * H, 1, D)
    for store in (src, dst):  # a decode step after the transfer sees the same KV on both sides
        store.append(step_k, step_v)
    torch.testing.assert_close(dst.attend(q, D ** -0.5), src.attend(q, D ** -0.5), rtol=1e-3, atol=1e-3)
    if name == "hack":
        assert dst.stored_bytes().total == src.stored_bytes().total
