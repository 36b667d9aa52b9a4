import pytest
import torch

from deepgen.io.checkpoints import STATE, load_checkpoint_dir, save_checkpoint_dir


def test_round_trip_keeps_tensors_and_state(tmp_path):
    ckpt = {
        "state_dict": {"a.weight": torch.randn(3, 2), "b": torch.arange(4)},
        "global_step": 7,
        "optimizer_states": [
            {"state": {0: {"exp_avg": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95)}]}
        ],
    }
    save_checkpoint_dir(ckpt, tmp_path / "step=7")
    loaded = load_checkpoint_dir(tmp_path / "step=7")
    assert loaded["global_step"] == 7
    assert torch.equal(loaded["state_dict"]["a.weight"], ckpt["state_dict"]["a.weight"])
    assert torch.equal(loaded["optimizer_states"][0]["state"][0]["exp_avg"], torch.ones(2))
    assert not (tmp_path / "step=7.tmp").exists()


class NotData:
    pass


def test_state_that_needs_pickled_code_is_refused_and_leaves_no_checkpoint(tmp_path):
    with pytest.raises(Exception, match="[Ww]eights only"):
        save_checkpoint_dir({"state_dict": {}, "callback": NotData()}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.tmp").exists()


def test_loading_uses_weights_only(tmp_path, monkeypatch):
    save_checkpoint_dir({"state_dict": {"w": torch.zeros(1)}, "step": 1}, tmp_path / "c")
    seen = {}
    original = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_checkpoint_dir(tmp_path / "c")
    assert seen["weights_only"] is True


def test_missing_files_give_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="not a deepgen checkpoint"):
        load_checkpoint_dir(tmp_path / "x")
    assert STATE == "state.pt"
