"""`distillery generate` from the command line: it writes the PNG; bad input is an error naming it, nothing written."""

import pytest
from PIL import Image

from distillery.cli import main


def test_generate_writes_png(tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--guidance", "2", "--steps", "3", "--seed", "0", "-o", str(out)]) == 0
    assert Image.open(out).size == (32, 32)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--steps", "0"], "steps"),
        (["--steps", "1001"], "[1, 1000]"),
        (["--guidance", "-1"], "guidance"),
        (["--guidance", "nan"], "finite"),
        (["--guidance", "inf"], "guidance"),
        (["--scheduler", "plms"], "scheduler"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, capsys, args, needle):
    out = tmp_path / "x.png"
    assert main(["generate", "x", "-o", str(out), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_wrong_type_is_rejected_by_argparse(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "x", "--steps", "many"])
    assert exc.value.code == 2
    assert "--steps" in capsys.readouterr().err
