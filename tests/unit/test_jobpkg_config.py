"""job.toml parsing and per-upload parameters (batchworker.jobpkg.config)."""

import pytest

from batchworker.jobpkg import InvalidJobConfig, InvalidParams, JobConfig, load_job_config, parse_job_config

GOOD = """
name = "wordstats"
entrypoint = "handler:Job"
requirements = "requirements.txt"
accept = [".txt", ".zip", ".txt"]
max_failed_ratio = 0.25
description = "counts words"

[params.top]
type = "int"
default = 10
min = 1
max = 1000

[params.scale]
type = "float"
default = 1

[params.mode]
type = "str"
default = "fast"
choices = ["fast", "exact"]

[params.lower]
type = "bool"
default = false

[params.label]
type = "str"
description = "required: no default"
"""


def config(text=GOOD) -> JobConfig:
    return parse_job_config(text, origin="job.toml")


def test_good_config_parses():
    c = config()
    assert (c.name, c.module, c.class_name) == ("wordstats", "handler", "Job")
    assert c.requirements == "requirements.txt"
    assert c.accept == (".txt", ".zip")  # duplicates dropped
    assert c.max_failed_ratio == 0.25
    assert c.params["scale"].default == 1.0 and isinstance(c.params["scale"].default, float)
    assert c.params["mode"].choices == ("fast", "exact")
    assert c.params["label"].required and not c.params["lower"].required


def test_minimal_config_defaults():
    c = config('name = "a"\nentrypoint = "pkg.mod:Cls"\naccept = [".csv"]\n')
    assert c.requirements is None and c.max_failed_ratio == 0.0 and dict(c.params) == {}
    assert c.module_paths == ("pkg/mod.py", "pkg/mod/__init__.py")


@pytest.mark.parametrize(
    "text, words",
    [
        ('name = "Word"\nentrypoint = "h:J"\naccept = [".txt"]', ["name", "lowercase"]),
        ('name = "' + "a" * 41 + '"\nentrypoint = "h:J"\naccept = [".txt"]', ["name"]),
        ('name = "a"\nentrypoint = "handler.Job"\naccept = [".txt"]', ["entrypoint", "module:Class"]),
        ('name = "a"\nentrypoint = "h:J"', ["accept"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = []', ["accept"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".TXT"]', ["'.TXT'", "'.txt'"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = ["txt"]', ["'txt'", "dot"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]\nmax_failed_ratio = 1.5', ["max_failed_ratio"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]\nrequirements = "../r.txt"', ["requirements", "outside"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]\nrequirements = "/etc/r.txt"', ["requirements"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]\nacept = 1', ["'acept'", "did you mean 'accept'"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]\n[params.x]\ntype = "list"', ["[params.x]", "type"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]\n[params.x]\ntype = "int"\ndefault = "3"',
         ["[params.x] default", "whole number"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]\n[params.x]\ntype = "int"\ndefault = 0\nmin = 1',
         ["[params.x] default does not fit", "minimum"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]\n[params.x]\ntype = "int"\nmin = 5\nmax = 1',
         ["min 5 is above max 1"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]\n[params.x]\ntype = "str"\nmin = 1', ["min and max"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]\n[params.x]\ntype = "int"\ndefualt = 1',
         ["'defualt'", "did you mean 'default'"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]\n[params.Top]\ntype = "int"', ["'Top'", "lowercase"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]\n[params.x]\ntype = "int"\nchoices = [1, "2"]',
         ["choices"]),
        ('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]\nparams = 3', ["params"]),
        ('name = "a"\nentrypoint = h:J', ["not valid TOML"]),
    ],
)
def test_invalid_config_names_the_field(text, words):
    with pytest.raises(InvalidJobConfig) as raised:
        config(text)
    message = str(raised.value)
    assert message.startswith("job.toml: ")
    for word in words:
        assert word in message


def test_accepts_by_lowercased_extension_of_the_name():
    c = config()
    assert c.accepts("wordstats/a/b.txt") and c.accepts("wordstats/B.TXT") and c.accepts("x.zip")
    assert not c.accepts("wordstats/b.csv") and not c.accepts("wordstats/.txt") and not c.accepts("txt/")
    assert not c.accepts("wordstats/a.txt/b")


def test_resolve_params_coerces_strings_and_applies_defaults():
    c = config()
    resolved = c.resolve_params({"top": "3", "scale": " 2.5 ", "lower": "TRUE", "label": "x"})
    assert resolved == {"top": 3, "scale": 2.5, "mode": "fast", "lower": True, "label": "x"}
    assert list(resolved) == list(c.params)  # declaration order
    assert c.resolve_params({"label": "y", "top": 7, "scale": 3})["scale"] == 3.0  # typed values too


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"label": "x", "top": "0"}, ["'top'", "minimum 1"]),
        ({"label": "x", "top": "1001"}, ["'top'", "maximum 1000"]),
        ({"label": "x", "top": "three"}, ["'top'", "whole number", "'three'"]),
        ({"label": "x", "top": "2.0"}, ["'top'", "whole number"]),
        ({"label": "x", "scale": "nan"}, ["'scale'", "finite"]),
        ({"label": "x", "lower": "maybe"}, ["'lower'", "true or false"]),
        ({"label": "x", "mode": "slow"}, ["'mode'", "'fast'", "'exact'"]),
        ({"label": "x", "topp": "3"}, ["'topp'", "did you mean 'top'"]),
        ({}, ["'label'", "required", "param-label"]),
        ({"label": "x", "top": True}, ["'top'", "whole number"]),
        ({"label": "x" * 2000}, ["'label'", "1024"]),
    ],
)
def test_bad_params_name_the_parameter(raw, words):
    with pytest.raises(InvalidParams) as raised:
        config().resolve_params(raw)
    for word in words:
        assert word in str(raised.value)


def test_job_without_params_rejects_any():
    c = config('name = "a"\nentrypoint = "h:J"\naccept = [".txt"]')
    assert c.resolve_params({}) == {}
    with pytest.raises(InvalidParams, match="takes no parameters"):
        c.resolve_params({"top": "1"})


def test_dict_round_trip_is_json_safe():
    import json

    c = config()
    again = JobConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert again == c


def test_from_dict_validates_like_toml():
    data = config().to_dict()
    data["name"] = "Bad"
    with pytest.raises(InvalidJobConfig, match="stored: name"):
        JobConfig.from_dict(data, origin="stored")


def test_load_checks_files_inside_the_package(tmp_path):
    (tmp_path / "job.toml").write_text('name = "a"\nentrypoint = "handler:Job"\naccept = [".txt"]\n'
                                       'requirements = "requirements.txt"\n')
    with pytest.raises(InvalidJobConfig, match="requirements"):
        load_job_config(tmp_path)
    (tmp_path / "requirements.txt").write_text("")
    with pytest.raises(InvalidJobConfig, match="handler.py nor handler/__init__.py"):
        load_job_config(tmp_path)
    (tmp_path / "handler.py").write_text("class Job: ...\n")
    assert load_job_config(tmp_path).name == "a"


def test_load_without_job_toml(tmp_path):
    with pytest.raises(InvalidJobConfig, match="no job.toml"):
        load_job_config(tmp_path)
