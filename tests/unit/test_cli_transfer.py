"""`batchworker results` keeps every downloaded output inside the job's folder."""

from pathlib import Path

import pytest

from batchworker.cli.transfer import local_path

TARGET = Path("/results/j-0123456789abcdef")


@pytest.mark.parametrize("name, expected", [
    ("manifest.json", TARGET / "manifest.json"),
    ("outputs/a/b.edges.png", TARGET / "outputs" / "a" / "b.edges.png"),
    ("results.csv", TARGET / "results.csv"),
])
def test_output_names_map_inside_the_folder(name, expected):
    assert local_path(TARGET, name) == expected


@pytest.mark.parametrize("name", ["", "../x", "outputs/../../x", "outputs//x", "/etc/passwd", "outputs/./x",
                                  "outputs/a\\..\\b", "outputs/"])
def test_names_that_would_leave_the_folder_are_skipped(name):
    assert local_path(TARGET, name) is None
