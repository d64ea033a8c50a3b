import subprocess
import sys

import numpy as np
import PIL.Image

from subjectpaint import cli
from tests.conftest import box_mask_image, random_image


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "subjectpaint.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "inpaint" in proc.stdout


def test_inpaint_writes_result_and_grid_with_a_progress_bar(tmp_path, capsys):
    room, mask, exemplar = tmp_path / "room.png", tmp_path / "mask.png", tmp_path / "ex.jpg"
    random_image(48, 32, 1).save(room)
    box_mask_image(48, 32, (10, 8, 30, 24)).save(mask)
    random_image(30, 30, 2).save(exemplar)
    out, grid = tmp_path / "o" / "placed.png", tmp_path / "grid.png"
    code = cli.main(["inpaint", str(room), str(mask), str(exemplar), "-o", str(out), "--grid", str(grid),
                     "--base", "tiny", "--steps", "3", "--seed", "1"])
    captured = capsys.readouterr()
    assert code == 0 and "wrote" in captured.out
    assert "denoising" in captured.err  # the progress bar
    placed = PIL.Image.open(out)
    assert placed.size == (48, 32)
    outside = np.ones((32, 48), bool)
    outside[2:30, 4:36] = False  # mask grown by dilate + feather
    assert np.array_equal(np.asarray(placed)[outside], np.asarray(PIL.Image.open(room))[outside])
    g = PIL.Image.open(grid)
    assert g.height > 32 and g.width > 4 * 32  # four panels side by side


def test_files_the_cli_writes_honour_the_umask(tmp_path):
    import os
    import stat

    for umask, mode in ((0o022, 0o644), (0o077, 0o600)):
        old = os.umask(umask)
        try:
            assert cli.main(["demo", "-o", str(tmp_path / oct(umask)), "--base", "tiny", "--steps", "1", "-q"]) == 0
        finally:
            os.umask(old)
        written = sorted((tmp_path / oct(umask)).iterdir())
        assert [p.name for p in written] == ["demo_grid.png", "demo_placed.png"]  # no temporary file left
        assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {mode}
