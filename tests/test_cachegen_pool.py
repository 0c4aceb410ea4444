"""CacheGen's coder pool (hack_cli/methods/cachegen_pool.py): the streams coded on worker processes are byte for byte
those coded in process, decode back exactly (also when the decode worker starts them at receive, ahead of
admission), a bad quant.coder_workers is a one-line ConfigError, and a dead worker a one-line HackError, not a hang.
The pool has 2 processes (started once, on first use) and takes every request here, however small."""
import math
import os
import signal
import time

import pytest
import torch

from hack_cli.errors import ConfigError, HackError
from hack_cli.hf import make_method, prepare_model
from hack_cli.hf.models import load_model, model_config
from hack_cli.methods import cachegen_pool as pool
from hack_cli.methods.cachegen import Decoding
from hack_cli.serve.decode import DecodeEngine, NullWriter
from hack_cli.serve.link import (H_FIRST_TOKEN, H_OUTPUT, H_PAYLOAD_BYTES, H_PROMPT, H_RID, HEADER_LEN,
                                 pack_payload)
from hack_cli.serve.prefill import export_payload, prefill_payload, prompt_ids

H, D, LAYERS, WORKERS = 2, 64, 3, 2


@pytest.fixture
def small_work(monkeypatch):
    """Requests of any size go to the pool."""
    monkeypatch.setattr(pool, "MIN_POOL_SYMBOLS", 0)


def prompt_stores(method, tokens=700, tail=0, seed=0):
    """Every layer's store holding one sequence: a prompt of `tokens` (different KV per layer), then `tail` tokens
    appended one by one (16-bit on the decode side)."""
    g = torch.Generator().manual_seed(seed)
    stores = []
    for i in range(LAYERS):
        s = method.new_layer(i, LAYERS, 1, H, D, "cpu", torch.float32)
        k, v = (torch.randn(1, H, tokens + tail, D, generator=g).cumsum(2) / 20 for _ in range(2))
        s.append(k[:, :, :tokens], v[:, :, :tokens])
        for t in range(tokens, tokens + tail):
            s.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        stores.append(s)
    return stores


def methods(**fields):
    return make_method("cachegen", coder_workers=1, **fields), make_method("cachegen", coder_workers=WORKERS, **fields)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_pool_streams_are_the_serial_bytes(small_work):
    serial, pooled = methods(chunk=300)  # chunks of 300, 300, 100 tokens
    want = serial.export_layers(prompt_stores(serial, tail=2), 0)
    got = pooled.export_layers(prompt_stores(pooled, tail=2), 0)
    assert len(want[0]["stream_bytes"]) == 3 and all(same(w, g) for w, g in zip(want, got))
    one = prompt_stores(pooled, tail=2)[1]  # one layer's chunks through export_seq
    assert same(one.export_seq(0), want[1]) and one.transfer_bytes().total == \
        sum(t.nbytes for t in want[1].values())


def test_arena_falls_back_to_the_temp_dir_when_dev_shm_is_small(small_work, monkeypatch, tmp_path):
    """Containers often give /dev/shm 64 MB: the arena's file then goes to the temporary directory, with the same
    bytes, and is deleted when the request is done."""
    import shutil
    import tempfile

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda d: real(d)._replace(free=0) if d == "/dev/shm" else real(d))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(pool, "_spare", [])
    serial, pooled = methods(chunk=300)
    want = serial.export_layers(prompt_stores(serial), 0)
    assert all(same(w, g) for w, g in zip(want, pooled.export_layers(prompt_stores(pooled), 0)))
    (spare,) = pool._spare
    assert spare.path.startswith(str(tmp_path))
    spare.discard()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("tokens", [611, 301])  # a last chunk ending inside a group; one holding a lone anchor
def test_pool_decode_roundtrips(small_work, tokens):
    serial, pooled = methods(chunk=300)
    src = prompt_stores(serial, tokens, tail=3, seed=tokens)
    states = serial.export_layers(src, 0)
    prepared = pooled.prepare_import(states)
    assert isinstance(prepared, Decoding) and isinstance(prepared.coder, pool.Pooled)
    installed = {}
    for name, method, how in (("pool", pooled, prepared), ("serial", serial, states), ("pool, raw", pooled, states)):
        installed[name] = [method.new_layer(i, LAYERS, 1, H, D, "cpu", torch.float32) for i in range(LAYERS)]
        method.import_layers(installed[name], 0, how)
    for i, s in enumerate(src):
        for name, stores in installed.items():
            r = stores[i]
            assert int(r.lengths[0]) == tokens + 3 and torch.equal(r.tail["k"][0, :, :3], s.tail["k"][0, :, :3])
            for t_name, t in r.t.items():
                assert torch.equal(s.t[t_name][:, :, :t.shape[2]], t), (name, i, t_name)
    r = pooled.new_layer(1, LAYERS, 2, H, D, "cpu", torch.float32)  # import_seq into sequence 1 of a batch
    r.import_seq(1, states[1])
    assert torch.equal(r.decoded_seq(1)[0], src[1].decoded_seq(0)[0])
    with pytest.raises(HackError, match="empty slot"):
        r.import_seq(1, states[1])


def test_coder_workers_config():
    with pytest.raises(ConfigError, match="quant.coder_workers") as err:
        make_method("cachegen", coder_workers=-1)
    assert "\n" not in str(err.value)
    assert make_method("cachegen").config.coder_workers == 0
    assert 1 <= pool.resolve(0) <= 16 and pool.resolve(0) == pool.auto_workers() and pool.resolve(3) == 3
    assert not make_method("cachegen", coder_workers=1).decodes_ahead
    assert make_method("cachegen", coder_workers=2).decodes_ahead
    big = math.prod((32, 1024, 4096))  # an 8B model's 4K-token prompt: the pool; a tiny one: in process
    assert isinstance(pool.coder(2, 1000, 0), pool.InProcess) and isinstance(pool.coder(1, big, 0), pool.InProcess)


def test_decode_starts_at_receive(small_work):
    """The decode worker unpacks a CacheGen payload and submits its decoding when it arrives; admission installs
    what the pool decoded: the same stores as an in-process install."""
    model, _ = load_model(model_config("tiny"), torch.device("cpu"))
    model = prepare_model(model)
    serial, pooled = methods()
    cache, first = prefill_payload(model, pooled, prompt_ids(0, 0, 140, model.config.vocab_size, "cpu"))
    buf, manifest = pack_payload(export_payload(cache))
    header = torch.zeros(HEADER_LEN, dtype=torch.float64)
    for i, v in ((H_RID, 0), (H_PROMPT, 140), (H_OUTPUT, 4), (H_PAYLOAD_BYTES, buf.numel()), (H_FIRST_TOKEN, first)):
        header[i] = v
    engine = DecodeEngine(model, pooled, torch.device("cpu"), float("inf"), NullWriter(), time.monotonic())
    engine.receive((header, manifest, buf, time.monotonic()))
    rec, _, payload, _, prepared = engine.waiting[0]
    assert payload is None and isinstance(prepared.coder, pool.Pooled)
    engine.admit()
    assert rec.admit <= rec.install_end and engine.active[0].record is rec
    want = DecodeEngine(model, serial, torch.device("cpu"), float("inf"), NullWriter(), time.monotonic())
    for got, ref in zip(engine.active[0].stores, want.install(manifest, buf)):
        assert all(torch.equal(got.t[name], t) for name, t in ref.t.items())


def test_a_dead_worker_is_a_clear_error(small_work):
    """A worker killed: the next request's coding fails at once with one line (the pool notices the death and fails
    what it holds, or refuses new jobs); the request after it starts a fresh pool. Last here: it replaces the pool."""
    _, pooled = methods(chunk=300)
    pid = pool.get_pool(WORKERS).executor.submit(os.getpid).result()
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(HackError, match="coder worker process died") as err:
        for _ in range(100):  # jobs that beat the notice run on the other worker
            pooled.export_layers(prompt_stores(pooled), 0)
            time.sleep(0.05)
    assert "\n" not in str(err.value) and time.monotonic() - start < 20
    serial, _ = methods(chunk=300)
    assert all(same(w, g) for w, g in zip(serial.export_layers(prompt_stores(serial), 0),
                                           pooled.export_layers(prompt_stores(pooled), 0)))
