"""Package discovery with the import names of pyproject.toml's `package-dir` (kernels/ -> hack_kernels)."""
from setuptools import find_packages, setup


def renamed(src: str, name: str) -> list[str]:
    return [name + p[len(src):] for p in find_packages(include=[src, src + ".*"])]


setup(packages=find_packages(include=["hack_cli", "hack_cli.*"]) + renamed("kernels", "hack_kernels")
      + renamed("conf", "hack_conf"))
