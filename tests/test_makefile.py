"""`make help` (and a bare `make`): every target of the Makefile, one line each."""
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which('make') is None, reason='no make on this machine')


def makefile_targets() -> list:
    """The targets the Makefile defines by name (`name:` at the start of a line), not the files it builds."""
    text = open(f'{ROOT}/Makefile').read()
    return [m.group(1) for m in re.finditer(r'^([a-z][a-z0-9_-]*):(?!=)', text, re.M)]


def help_lines(*goal) -> dict:
    out = subprocess.run(['make', '-s', '-C', ROOT, *goal], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [line.split(None, 1) for line in out.stdout.splitlines()]
    assert all(len(parts) == 2 for parts in lines), out.stdout  # a name and its line
    names = [parts[0] for parts in lines]
    assert len(names) == len(set(names)), names
    return dict(lines)


def test_make_help_lists_every_target_with_one_line():
    listed = help_lines('help')
    assert sorted(listed) == sorted(makefile_targets())
    assert {'demo', 'test', 'help', 'compare-rules'} <= set(listed)
    assert all(len(text) > 10 for text in listed.values()), listed


def test_a_bare_make_is_make_help():
    assert help_lines() == help_lines('help')
