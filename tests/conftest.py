"""Shared pytest fixtures: the real BUSI folder (skipped when absent), a small phantom dataset, one torch thread."""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BUSI = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "busi"))


def busi_root_or_none():
    """USDET_BUSI_ROOT, else ../shared/data/busi beside the repository; None when neither has BUSI."""
    root = os.environ.get("USDET_BUSI_ROOT", DEFAULT_BUSI)
    if all(os.path.isdir(os.path.join(root, c)) for c in ("benign", "malignant", "normal")):
        return root
    return None


@pytest.fixture(scope="session")
def busi_root():
    root = busi_root_or_none()
    if root is None:
        pytest.skip(f"BUSI not found at {os.environ.get('USDET_BUSI_ROOT', DEFAULT_BUSI)}: set USDET_BUSI_ROOT "
                    "to a folder holding benign/, malignant/, normal/")
    return root


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory):
    """A 24-image, 128 px phantom COCO dataset (benign,malignant classes); returns its folder.

    Layout: images/, annotations/{train,val,test}.json, pixel_stats.json, report.json.
    Session-scoped and read-only: copy it before modifying anything.
    """
    from usdet.data.phantom import make_phantom_dataset

    return make_phantom_dataset(str(tmp_path_factory.mktemp("phantom")), num_images=24, size=128, seed=0,
                                classes="benign,malignant")


@pytest.fixture
def one_thread():
    """Two cores are shared by everyone: one torch thread is much faster than two fighting."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
