"""One-line messages of the command line that a new user met (in process: fast): a missing subcommand is
named by its choices, a model without pretrained weights says so, a resumed run whose epochs are all saved
says it is finishing, and counts agree with their nouns."""

import types

import pytest

from fastvlm import cli
from fastvlm.models import TINY, check_pretrained


@pytest.mark.parametrize("argv,choices", [([], "{tune,pack,eval,bench,kernels,selfcheck}"),
                                          (["tune"], "{taskres,mask,orth,vpt,lora,adapter}")])
def test_a_missing_command_is_named_by_its_choices(capsys, argv, choices):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"required: {choices}" in err[0] and "cmd" not in err[0], err


def test_a_model_without_pretrained_weights_says_so():
    with pytest.raises(ValueError, match=f"open_clip has no pretrained weights for {TINY}; give a checkpoint file, "
                                         "or 'none'") as e:
        check_pretrained(TINY, "openai")
    assert "[]" not in str(e.value)


def test_resume_notes_count_the_saved_epochs(tmp_path):
    import torch

    out = cli.OutDir.__new__(cli.OutDir)
    out.args, out.ranks, out.path = types.SimpleNamespace(resume=True), types.SimpleNamespace(is_main=True), str(tmp_path)
    out.state = str(tmp_path / "train_state.pt")
    torch.save({"fastvlm_train_state": 1, "kind": "taskres", "epoch": 9, "step": 10}, out.state)  # epochs 1..10
    assert out.resume_note(40).startswith("resuming from epoch 11 of 40 (10 saved in ")
    torch.save({"fastvlm_train_state": 1, "kind": "taskres", "epoch": 39, "step": 40}, out.state)
    assert out.resume_note(40).startswith("resuming a run whose 40 epochs are all saved (in ")


def test_counts_agree_with_their_nouns():
    assert (cli._count(1, "epoch"), cli._count(2, "epoch"), cli._count(0, "epoch")) == ("1 epoch", "2 epochs", "0 epochs")


def test_a_block_size_that_does_not_divide_names_the_option(tmp_path, capsys):
    from .synthetic import make_image_folder

    make_image_folder(str(tmp_path / "data"), classes=3, per_class=4)
    argv = ["tune", "orth", "--model", TINY, "--pretrained", "none", "--data", str(tmp_path / "data"), "--shots", "2",
            "--epochs", "1", "--block-size", "7", "--out", str(tmp_path / "out"), "--no-progress"]
    assert cli.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fastvlm:")]
    assert err == [err[0]] and err[0].startswith("fastvlm: error: --block-size 7: block_size=7 must divide"), err
    assert not (tmp_path / "out").exists()
