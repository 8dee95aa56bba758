"""The README's test command on a machine without graphviz and chromium: what needs them skips and says why.

.ci/run installs both, so CI alone never sees a test that fails without them. Here pytest
runs the test files that use them in a subprocess whose PATH holds every program of this
PATH except `dot` and `chromium` (a folder of symlinks), as on a fresh Debian machine.
The tests and `shardfx viz` find both through shutil.which, so hiding them from PATH hides
them; a check that looked at a fixed path instead would not skip here on CI, and the
skip counts below would catch it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("dot", "chromium", "chromium-browser")
FILES = ["tests/tools/test_viz.py", "tests/tools/test_viz_browser.py"]  # every test file that uses dot or chromium
# (file, reason) -> tests skipped for it: every skip in FILES is one of these, with its reason
SKIPS = {
    ("tests/tools/test_viz.py", "graphviz's dot is not installed (apt-get install graphviz)"): 1,
    # (3 browser tests; the 48-layer one is slow, not in the default run the subprocess makes)
    ("tests/tools/test_viz_browser.py", "chromium is not installed (apt-get install chromium)"): 2,
}


def path_without(hidden: tuple[str, ...], folder: Path) -> str:
    """`folder` filled with a symlink to every program on PATH (the first of each name) except `hidden`."""
    folder.mkdir()
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            link = folder / entry.name
            if entry.name in hidden or link.exists() or link.is_symlink():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    return str(folder)


def test_tests_that_need_graphviz_or_chromium_skip_with_a_reason_without_them(tmp_path):
    env = {**os.environ, "PATH": path_without(HIDDEN, tmp_path / "bin")}
    found = subprocess.run(
        [sys.executable, "-c", f"import shutil; print([shutil.which(n) for n in {HIDDEN!r}])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == str([None] * len(HIDDEN)), found.stdout

    # Its own basetemp and no cache: this run shares the machine with the outer one.
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'run'}"]
    result = subprocess.run([*argv, *FILES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert not re.search(r"\b\d+ (failed|errors?)\b", out), out

    skipped: Counter[tuple[str, str]] = Counter()
    for count, file, reason in re.findall(r"^SKIPPED \[(\d+)\] ([^:\s]+):\d+: (.+)$", out, re.M):
        skipped[(file, reason.strip())] += int(count)
    assert dict(skipped) == SKIPS, out
    summary = re.search(r"(\d+) passed, (\d+) skipped", out)
    assert summary and int(summary[1]) > 0 and int(summary[2]) == sum(SKIPS.values()), out
