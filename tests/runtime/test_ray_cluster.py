"""What a Ray actor running the caller's backend reserves: a GPU exactly when the backend runs on
one (Ray hides every GPU from an actor that reserves none)."""

from types import SimpleNamespace

import pytest
from scan_deploy.runtime.ray_cluster import gpus_for

from scan_deploy.choices import Provider


@pytest.mark.parametrize(
    ("backend", "gpus"),
    [
        (SimpleNamespace(providers=[Provider.CPU]), 0.0),
        (SimpleNamespace(providers=[Provider.CUDA, Provider.CPU]), 1.0),
        (SimpleNamespace(providers=[Provider.TENSORRT, Provider.CUDA, Provider.CPU]), 1.0),
        (SimpleNamespace(device=SimpleNamespace(type="cpu")), 0.0),
        (SimpleNamespace(device=SimpleNamespace(type="cuda")), 1.0),
        (SimpleNamespace(name="tensorrt 10.3.0"), 1.0),
    ],
)
def test_an_actor_reserves_a_gpu_for_a_backend_on_one(backend, gpus):
    assert gpus_for(backend) == gpus


def test_the_cpu_backend_of_the_tests_reserves_none(trained):
    from scan_deploy.runtime.backends import open_backend

    from scan_deploy.bundle import load_bundle

    with open_backend(load_bundle(trained[2]), providers="cpu") as backend:
        assert gpus_for(backend) == 0.0
