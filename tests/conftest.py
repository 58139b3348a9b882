import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them when tests run model code.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_2b(tmp_path_factory):
    from cogvideox.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-2b"), style="2b")


@pytest.fixture(scope="session")
def tiny_5b(tmp_path_factory):
    from cogvideox.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-5b"), style="5b", scheduler="CogVideoXDPMScheduler"
    )
