import pytest

from ckpt_tools_helpers import train_sp


@pytest.fixture(scope="session")
def sp_models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    return {"fox": train_sp(tmp / "fox", 1000, "fox"), "gemma": train_sp(tmp / "gemma", 1000, "gemma")}
