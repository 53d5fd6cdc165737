import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from tests

import pytest  # noqa: E402
import torch  # noqa: E402

from storydiffusion.pipelines.tiny_random import tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def sd_pipe():
    return _quiet(tiny_sd_pipeline(seed=0))


@pytest.fixture
def sdxl_pipe():
    return _quiet(tiny_sdxl_pipeline(seed=0))


@pytest.fixture(params=["sd", "sdxl"])
def any_pipe(request):
    return _quiet(tiny_sd_pipeline(seed=0) if request.param == "sd" else tiny_sdxl_pipeline(seed=0))


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny models' small ops run faster on one thread, and the machine is shared: no thread-pool waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
