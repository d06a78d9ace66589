import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import build_checkpoint  # noqa: E402
from checkpoints import load_reference as _load_reference  # noqa: E402


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """per_layer layout (transformers >= 5.23), 6 layers (5 sliding + 1 full), window 8, fp32, tokenizer."""
    return build_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), layout="per_layer", seed=0, num_layers=6)


@pytest.fixture(scope="session")
def tiny_ckpt_hub(tmp_path_factory) -> Path:
    """Released hub layout, 3 layers (sliding, sliding, full), window 6, fp32, tokenizer."""
    return build_checkpoint(
        tmp_path_factory.mktemp("tiny_ckpt_hub"), layout="hub", seed=1, num_layers=3, sliding_window=6
    )


@pytest.fixture(scope="session")
def load_reference():
    """`load_reference(path, dtype="float32")`: the transformers model in eval mode, eager attention/experts."""
    return _load_reference


@pytest.fixture
def tiny_reference(tiny_ckpt):
    return _load_reference(tiny_ckpt)


@pytest.fixture
def tiny_hub_reference(tiny_ckpt_hub):
    return _load_reference(tiny_ckpt_hub)


def pytest_terminal_summary(terminalreporter):
    """Print the figures tests measured (parity diffs, agreement rates), so CI logs carry them."""
    from figures import FIGURES

    if FIGURES:
        terminalreporter.section("measured figures")
        for name, value in FIGURES:
            terminalreporter.write_line(f"{name}: {value}")
