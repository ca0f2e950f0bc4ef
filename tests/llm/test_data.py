"""Tests of amalab.llm.data (pairs, sources, tasks): formats, the HH prompt split, ids, errors, drops,
subsets, the held-out split."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import sys
import types
import zlib
from pathlib import Path

import pytest

from amalab.cli import main
from amalab.config import load_section
from amalab.errors import ConfigError
from amalab.llm.data.pairs import PreferencePair, example_id, split_shared_prompt
from amalab.llm.data.sources import DROP_REASONS, read_pairs
from amalab.llm.data.tasks import TaskConfig, held_out_count, load_task, load_tasks


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def explicit_rows(n: int) -> list[dict]:
    return [{"prompt": f"Q{i}?", "chosen": f" good {i}", "rejected": f" bad {i}", "extra": i}
            for i in range(n)]


# --- the shared-prompt split -------------------------------------------------------------------------

def test_hh_split_ends_prompt_at_last_shared_assistant_marker():
    prompt = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to X?\n\nAssistant:"
    # the two replies share their first words: the split must still be at the marker, not mid-reply
    chosen, rejected = " I can't help with that.", " I can tell you how."
    got = split_shared_prompt(prompt + chosen, prompt + rejected)
    assert got == (prompt, chosen, rejected)


def test_hh_split_when_transcripts_diverge_in_an_earlier_turn():
    common = "\n\nHuman: a\n\nAssistant:"
    chosen = common + " yes\n\nHuman: b\n\nAssistant: ok"
    rejected = common + " no\n\nHuman: b\n\nAssistant: ok"
    assert split_shared_prompt(chosen, rejected) == (common, chosen[len(common):], rejected[len(common):])


def test_plain_split_follows_trl_extract_prompt():
    # TRL: longest common prefix, moved back one character if it ends just after a space
    assert split_shared_prompt("The sky is blue.", "The sky is green.") == ("The sky is", " blue.", " green.")
    assert split_shared_prompt("abcX", "abcY") == ("abc", "X", "Y")
    assert split_shared_prompt("X", "Y") == ("", "X", "Y")


# --- ids ---------------------------------------------------------------------------------------------

def test_example_id_is_sha256_of_nul_joined_fields():
    expected = hashlib.sha256(b"p\x00c\x00r").hexdigest()[:32]
    assert example_id("p", "c", "r") == expected
    assert example_id("p", "c", "r") != example_id("pc", "", "r")  # field boundaries matter
    assert len(expected) == 32


# --- formats -----------------------------------------------------------------------------------------

def test_every_file_format_gives_the_same_pairs(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = explicit_rows(5)
    write_jsonl(tmp_path / "a.jsonl", rows)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    pq.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "a.parquet")
    expected = [PreferencePair(example_id(r["prompt"], r["chosen"], r["rejected"]), "t", r["prompt"],
                               r["chosen"], r["rejected"]) for r in rows]
    for name in ("a.jsonl", "a.jsonl.gz", "a.json", "a.parquet"):
        pairs, dropped, n_rows = read_pairs(name, "t", base_dir=tmp_path)
        assert pairs == expected, name
        assert n_rows == 5 and sum(dropped.values()) == 0


def test_implicit_prompt_rows(tmp_path):
    p = "\n\nHuman: q\n\nAssistant:"
    write_jsonl(tmp_path / "hh.jsonl", [{"chosen": p + " yes", "rejected": p + " no"}])
    (pair,), _, _ = read_pairs("hh.jsonl", "hh", base_dir=tmp_path)
    assert (pair.prompt, pair.chosen, pair.rejected) == (p, " yes", " no")


# --- errors: one line naming file, line and field ----------------------------------------------------

def error_of(tmp_path, lines: list[str], name="bad.jsonl") -> str:
    (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_task(TaskConfig("t", name), tmp_path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_malformed_json_names_file_and_line(tmp_path):
    good = json.dumps(explicit_rows(1)[0])
    message = error_of(tmp_path, [good, good, '{"prompt": "x", "chosen": '])
    assert f"{tmp_path / 'bad.jsonl'}:3: malformed JSON" in message


def test_missing_field_names_line_and_field(tmp_path):
    row = explicit_rows(2)
    del row[1]["rejected"]
    message = error_of(tmp_path, [json.dumps(r) for r in row])
    assert message.endswith("bad.jsonl:2: field 'rejected': missing")


def test_missing_prompt_after_explicit_first_row(tmp_path):
    rows = explicit_rows(3)
    del rows[2]["prompt"]
    assert error_of(tmp_path, [json.dumps(r) for r in rows]).endswith("bad.jsonl:3: field 'prompt': missing")


def test_non_string_field(tmp_path):
    rows = explicit_rows(1)
    rows[0]["chosen"] = [{"role": "assistant", "content": "hi"}]
    message = error_of(tmp_path, [json.dumps(r) for r in rows])
    assert "bad.jsonl:1: field 'chosen': expected a string, got list" in message


def test_non_object_row(tmp_path):
    assert "bad.jsonl:1: expected an object" in error_of(tmp_path, ['["a", "b"]'])


def test_json_file_errors_name_the_item(tmp_path):
    rows = explicit_rows(3)
    rows[1]["rejected"] = 7
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"a\.json: item 1: field 'rejected': expected a string, got int"):
        load_task(TaskConfig("t", "a.json"), tmp_path)
    (tmp_path / "b.json").write_text('{"prompt": 1}', encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a JSON list"):
        load_task(TaskConfig("t", "b.json"), tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.jsonl: no such data file"):
        load_task(TaskConfig("t", "nope.jsonl"), tmp_path)


def test_empty_task_names_the_source_and_why(tmp_path):
    rows = [{"prompt": "q", "chosen": " same", "rejected": " same"},
            {"prompt": "q", "chosen": " ", "rejected": "x"}]
    message = error_of(tmp_path, [json.dumps(r) for r in rows])
    assert "task 't' has no usable pairs (2 rows; dropped: 1 identical_chosen_rejected, 1 empty_completion)" \
        in message
    assert "task 't' has no usable pairs (0 rows" in error_of(tmp_path, [""], name="empty.jsonl")


# --- malformed files a user produces: one line naming the file and the line ---------------------------

def hh(human: str, assistant: str | None = None) -> str:
    return f"\n\nHuman: {human}" + ("" if assistant is None else f"\n\nAssistant: {assistant}")


def test_hh_transcripts_sharing_no_assistant_turn_are_dropped_and_counted(tmp_path):
    rows = [
        {"chosen": hh("hi"), "rejected": hh("hello")},                        # no Assistant turn at all
        {"chosen": hh("q0?", "yes 0"), "rejected": hh("q0?", "no 0")},
        {"chosen": hh("hi", "yes"), "rejected": hh("hello", "no")},          # the Human turns differ
        {"chosen": hh("q1?", "yes 1"), "rejected": hh("q1?", "no 1")},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},     # no dialogue: TRL's split
    ]
    write_jsonl(tmp_path / "hh.jsonl", rows)
    task = load_task(TaskConfig("hh", "hh.jsonl", held_out=0), tmp_path)
    expected = [(hh("q0?", "")[:-1], " yes 0", " no 0"), (hh("q1?", "")[:-1], " yes 1", " no 1"),
                ("The sky is", " blue.", " green.")]
    assert [(p.prompt, p.chosen, p.rejected) for p in task.train] == expected
    assert task.dropped["no_assistant_turn"] == 2 and sum(task.dropped.values()) == 2
    assert task.summary().endswith("5 rows, 3 train, 0 eval, 2 dropped (2 no_assistant_turn)")
    # a file of nothing but such rows is refused, saying why
    write_jsonl(tmp_path / "none.jsonl", [rows[0], rows[2]])
    with pytest.raises(ConfigError, match=r"none\.jsonl: task 'n' has no usable pairs "
                                          r"\(2 rows; dropped: 2 no_assistant_turn\)$"):
        load_task(TaskConfig("n", "none.jsonl"), tmp_path)


def write_bytes(path: Path, data: bytes) -> Path:
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("name", ["u.jsonl", "u.jsonl.gz", "u.json", "u.csv"])
def test_invalid_utf8_names_file_line_and_column(tmp_path, name):
    if name == "u.csv":
        text = b"Question,Best Answer,Best Incorrect Answer\nq1?,a,b\nq2?,caf\xe9 yes,no\n"
        line, column, source = 3, 8, f"truthfulqa:{name}"
    elif name == "u.json":
        text = b'[{"prompt": "q", "chosen": " a", "rejected": " b"},\n {"prompt": "q\xff", "chosen": " a",' \
               b' "rejected": " c"}]'
        line, column, source = 2, 15, name
    else:
        good = json.dumps(explicit_rows(1)[0]).encode()
        text = good + b"\n" + good + b"\n" + b'{"prompt": "q\xff", "chosen": " a", "rejected": " b"}\n'
        line, column, source = 3, 14, name
    path = write_bytes(tmp_path / name, text)
    assert text.splitlines()[line - 1][column - 1] in (0xE9, 0xFF)  # the position the message must name
    with pytest.raises(ConfigError) as info:
        load_task(TaskConfig("t", source), tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: not valid UTF-8: byte 0x") and f"at column {column}" in message
    assert "position" not in message and "\n" not in message


def gzip_rows(n: int) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in explicit_rows(n)).encode(), mtime=0)


@pytest.mark.parametrize("keep", [0.01, 0.3, 0.5, 0.9, -4, -1])
def test_truncated_gzip_names_the_last_whole_line(tmp_path, keep):
    whole = gzip_rows(400)
    cut = whole[:int(len(whole) * keep)] if keep > 0 else whole[:keep]
    (tmp_path / "t.jsonl.gz").write_bytes(cut)
    # what the truncated bytes still hold, decompressed independently of the reader
    available = zlib.decompressobj(wbits=31).decompress(cut)
    lines = available.count(b"\n")
    stops = f"after line {lines}" if lines else "within line 1"
    message = f"t.jsonl.gz: truncated gzip file: its data stops {stops}"
    with pytest.raises(ConfigError, match=re.escape(message) + "$"):
        load_task(TaskConfig("t", "t.jsonl.gz"), tmp_path)


def test_corrupt_or_plain_gzip_is_one_line(tmp_path):
    whole = bytearray(gzip_rows(50))
    whole[-6] ^= 0xFF  # the stored CRC-32 of the data: every line decompresses, the check at the end fails
    (tmp_path / "c.jsonl.gz").write_bytes(bytes(whole))
    with pytest.raises(ConfigError, match=r"c\.jsonl\.gz: corrupt gzip data after line 50 \(CRC check"):
        load_task(TaskConfig("t", "c.jsonl.gz"), tmp_path)
    write_jsonl(tmp_path / "p.jsonl.gz", explicit_rows(3))  # plain text under a .gz name
    with pytest.raises(ConfigError, match=r"p\.jsonl\.gz: not a gzip file, although its name ends in \.gz$"):
        load_task(TaskConfig("t", "p.jsonl.gz"), tmp_path)


@pytest.mark.parametrize("name,content", [("e.jsonl", b""), ("b.jsonl", b"\n  \n\n"), ("e.json", b"[]"),
                                          ("e.jsonl.gz", b"")])
def test_empty_file_is_one_line(tmp_path, name, content):
    write_bytes(tmp_path / name, content)
    message = f"{name}: task 't' has no usable pairs (0 rows; the source is empty)"
    with pytest.raises(ConfigError, match=re.escape(message) + "$"):
        load_task(TaskConfig("t", name), tmp_path)


@pytest.mark.parametrize("row,message", [
    ('["a", "b"]', "expected an object with fields chosen and rejected, got list"),
    ("null", "expected an object with fields chosen and rejected, got NoneType"),
    ('{"prompt": "q", "chosen": " a"}', "field 'rejected': missing"),
    ('{"prompt": "q", "rejected": " a", "chosen": null}', "field 'chosen': expected a string, got NoneType"),
    ('{"prompt": "q", "chosen": " a", "rejected": " b"', "malformed JSON: Expecting ',' delimiter "
                                                         "(column 49)"),  # just after the last character
])
def test_bad_row_in_the_middle_names_file_line_and_field(tmp_path, row, message):
    good = json.dumps(explicit_rows(1)[0])
    assert error_of(tmp_path, [good, "", good, row, good]) == f"{tmp_path / 'bad.jsonl'}:4: {message}"


def test_duplicate_task_names(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", explicit_rows(3))
    configs = [TaskConfig("a", "a.jsonl"), TaskConfig("b", "a.jsonl"), TaskConfig("a", "a.jsonl")]
    message = r"tasks\[2\]: field 'name': task name 'a' is already used by tasks\[0\]"
    with pytest.raises(ConfigError, match=message):
        load_tasks(configs, tmp_path)


CLI_CONFIG = """
out = "{out}"
device = "cpu"

[model]
name = "tiny"
tiny = {{ hidden_size = 16, intermediate_size = 32, num_hidden_layers = 1, num_attention_heads = 2, \
num_key_value_heads = 1, vocab_size = 300, seed = 0 }}

[tokenize]
max_length = 40
max_prompt_length = 24

[[tasks]]
name = "hh"
source = "{source}"
held_out = 2

[specialists.optim]
max_steps = 1
batch_size = 2

[methods]
names = ["standard"]
"""


def run_cli(tmp_path: Path, source: str, capsys, quiet: bool = False) -> tuple[int, str, str]:
    config = tmp_path / "config.toml"
    config.write_text(CLI_CONFIG.format(out=tmp_path / "run", source=source))
    code = main(["llm", "specialists", str(config)] + (["--quiet"] if quiet else []))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_drops_hh_rows_without_an_assistant_turn_and_reports_them(tmp_path, capsys):
    rows = [{"chosen": hh("hi"), "rejected": hh("hello")}, {"chosen": hh("a", "b"), "rejected": hh("c", "d")}]
    rows += [{"chosen": hh(f"q{i}?", f"yes {i}"), "rejected": hh(f"q{i}?", f"no {i}")} for i in range(6)]
    write_jsonl(tmp_path / "hh.jsonl", rows)
    code, out, err = run_cli(tmp_path, "hh.jsonl", capsys)
    assert code == 0, err
    assert "task 'hh' (hh.jsonl): 8 rows, 4 train, 2 eval, 2 dropped (2 no_assistant_turn)" in out
    report = json.loads((tmp_path / "run" / "data.json").read_text())["hh"]
    assert report["dropped_rows"]["no_assistant_turn"] == 2 and sum(report["dropped_rows"].values()) == 2
    assert (report["train"], report["eval"]) == (4, 2)


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.jsonl.gz", "cut.jsonl.gz", "empty.jsonl"])
def test_cli_bad_data_file_is_one_line_naming_file_and_line(tmp_path, capsys, name):
    good = json.dumps(explicit_rows(1)[0]).encode() + b"\n"
    if name == "cut.jsonl.gz":
        (tmp_path / name).write_bytes(gzip_rows(400)[:-1000])
    else:
        write_bytes(tmp_path / name, b"" if name == "empty.jsonl" else good * 4 + b'{"prompt": "\xc3("}\n')
    code, out, err = run_cli(tmp_path, name, capsys, quiet=True)
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    expected = {"bad.jsonl": "bad.jsonl:5: not valid UTF-8: byte 0xc3 at column 13 (invalid continuation",
                "bad.jsonl.gz": "bad.jsonl.gz:5: not valid UTF-8: byte 0xc3 at column 13",
                "cut.jsonl.gz": "cut.jsonl.gz: truncated gzip file: its data stops after line",
                "empty.jsonl": "empty.jsonl: task 'hh' has no usable pairs (0 rows; the source is empty)",
                }[name]
    assert expected in err, err


# --- drops -------------------------------------------------------------------------------------------

def test_dropped_rows_are_counted_per_reason(tmp_path):
    rows = explicit_rows(4) + [
        {"prompt": "q", "chosen": " same", "rejected": " same"},     # identical
        {"prompt": "q", "chosen": " \n", "rejected": " bad"},        # empty completion
        {"prompt": "q", "chosen": " ok", "rejected": ""},            # empty completion
        {"prompt": "  ", "chosen": " ok", "rejected": " bad"},       # empty prompt
        explicit_rows(4)[2], explicit_rows(4)[2],                    # two duplicates
    ]
    write_jsonl(tmp_path / "d.jsonl", rows)
    task = load_task(TaskConfig("d", "d.jsonl", held_out=0), tmp_path)
    assert set(task.dropped) == set(DROP_REASONS)
    assert task.dropped == {"identical_chosen_rejected": 1, "empty_completion": 2, "empty_prompt": 1,
                            "no_assistant_turn": 0, "duplicate": 2, "eval_in_train": 0,
                            "over_max_examples": 0}
    assert [p.prompt for p in task.train] == ["Q0?", "Q1?", "Q2?", "Q3?"]  # file order, first copy kept
    assert task.rows == 10
    assert task.summary().endswith("10 rows, 4 train, 0 eval, 6 dropped (1 identical_chosen_rejected, "
                                   "2 empty_completion, 1 empty_prompt, 2 duplicate)")


# --- held-out split and max_examples -----------------------------------------------------------------

def ids(pairs):
    return [p.id for p in pairs]


def test_held_out_split_is_a_partition_of_the_right_size(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", explicit_rows(50))
    task = load_task(TaskConfig("a", "a.jsonl", held_out=0.2, seed=3), tmp_path)
    assert len(task.eval) == 10 and len(task.train) == 40
    assert set(ids(task.train)).isdisjoint(ids(task.eval))
    all_ids = [example_id(r["prompt"], r["chosen"], r["rejected"]) for r in explicit_rows(50)]
    assert sorted(ids(task.train) + ids(task.eval)) == sorted(all_ids)
    # train keeps file order
    assert ids(task.train) == [i for i in all_ids if i in set(ids(task.train))]
    counted = load_task(TaskConfig("a", "a.jsonl", held_out=7, seed=3), tmp_path)
    assert len(counted.eval) == 7
    # the default is 10 %
    assert len(load_task(TaskConfig("a", "a.jsonl"), tmp_path).eval) == 5


def test_held_out_count_rounding():
    assert held_out_count(10, 0.1) == 1
    assert held_out_count(3, 0.1) == 1  # a positive fraction holds out at least one pair
    assert held_out_count(10, 0.0) == 0
    assert held_out_count(10, 4) == 4


def test_held_out_split_depends_on_ids_and_seed_only(tmp_path):
    rows = explicit_rows(60)
    write_jsonl(tmp_path / "a.jsonl", rows)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    write_jsonl(tmp_path / "b.jsonl", shuffled)
    a = load_task(TaskConfig("a", "a.jsonl", held_out=0.25, seed=1), tmp_path)
    b = load_task(TaskConfig("a", "b.jsonl", held_out=0.25, seed=1), tmp_path)
    assert set(ids(a.eval)) == set(ids(b.eval))
    c = load_task(TaskConfig("a", "a.jsonl", held_out=0.25, seed=2), tmp_path)
    assert set(ids(a.eval)) != set(ids(c.eval))


def test_held_out_that_leaves_no_training_pairs(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", explicit_rows(3))
    with pytest.raises(ConfigError, match="held_out = 3 takes 3 of its 3 pairs and leaves none for training"):
        load_task(TaskConfig("a", "a.jsonl", held_out=3), tmp_path)


def test_max_examples_is_deterministic_nested_and_counted(tmp_path):
    rows = explicit_rows(40)
    write_jsonl(tmp_path / "a.jsonl", rows)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    write_jsonl(tmp_path / "b.jsonl", shuffled)

    def kept(source, m):
        task = load_task(TaskConfig("a", source, held_out=0, max_examples=m), tmp_path)
        assert task.dropped["over_max_examples"] == 40 - m
        return set(ids(task.train))

    small, large = kept("a.jsonl", 10), kept("a.jsonl", 20)
    assert len(small) == 10 and len(large) == 20 and small < large
    assert kept("b.jsonl", 10) == small


def test_eval_source_drops_pairs_that_are_also_training_pairs(tmp_path):
    rows = explicit_rows(6)
    write_jsonl(tmp_path / "train.jsonl", rows[:4])
    write_jsonl(tmp_path / "test.jsonl", rows[3:])
    task = load_task(TaskConfig("a", "train.jsonl", eval_source="test.jsonl"), tmp_path)
    assert len(task.train) == 4 and [p.prompt for p in task.eval] == ["Q4?", "Q5?"]
    assert task.dropped["eval_in_train"] == 1 and task.rows == 7


# --- configs -----------------------------------------------------------------------------------------

def test_task_config_loads_with_load_section():
    table = {"name": "hh", "source": "data/hh.jsonl.gz", "held_out": 100, "max_examples": 500, "seed": 4}
    config = load_section(TaskConfig, table, "run.toml", "tasks")
    assert config == TaskConfig("hh", "data/hh.jsonl.gz", held_out=100, max_examples=500, seed=4)
    assert isinstance(config.held_out, int)
    fraction = load_section(TaskConfig, {"name": "a", "source": "a.json", "held_out": 0.05}, "run.toml", "t")
    assert fraction.held_out_amount == 0.05


@pytest.mark.parametrize("table, message", [
    ({"name": "a", "source": "a.json", "held_out": 1.5}, "held_out as a fraction must lie in [0, 1)"),
    ({"name": "a", "source": "a.json", "held_out": -2}, "held_out as a count must be >= 0"),
    ({"name": "a", "source": "a.json", "held_out": 0.1, "eval_source": "b.json"}, "held_out and eval_source"),
    ({"name": "a", "source": "a.csv"}, "source 'a.csv': a local file must end with one of"),
    ({"name": "a", "source": "a.json", "eval_source": "hf:"}, "eval_source 'hf:' names no dataset"),
    ({"name": "a", "source": "truthfulqa:x.json"}, "truthfulqa: takes the path of a TruthfulQA .csv"),
    ({"name": "", "source": "a.json"}, "name must be a non-empty string"),
    ({"name": "a", "source": "a.json", "max_examples": 0}, "max_examples must be an integer >= 1"),
    ({"name": "a", "source": "a.json", "sed": 1}, "unknown key 'sed'"),
])
def test_task_config_errors_name_the_field(table, message):
    with pytest.raises(ConfigError) as info:
        load_section(TaskConfig, table, "run.toml", "tasks")
    assert str(info.value).startswith("run.toml: [tasks]: ")
    assert message in str(info.value)


# --- Hugging Face sources, with a stand-in `datasets` module (no network) ----------------------------

def test_hf_source_reads_rows_of_the_split(monkeypatch):
    calls = []

    def load_dataset(dataset_id, split):
        calls.append((dataset_id, split))
        return explicit_rows(10)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = load_task(TaskConfig("h", "hf:org/prefs", split="train_prefs", held_out=2))
    assert calls == [("org/prefs", "train_prefs")]
    assert len(task.train) == 8 and task.source == "hf:org/prefs"


def test_hf_source_errors(monkeypatch):
    rows = explicit_rows(3)
    rows[2]["chosen"] = None
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda i, split: rows))
    with pytest.raises(ConfigError, match=r"hf:org/x\[train\]: row 2: field 'chosen': expected a string"):
        load_task(TaskConfig("h", "hf:org/x"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ConfigError, match="needs the `datasets` package"):
        load_task(TaskConfig("h", "hf:org/x"))


# --- the real data in ../shared/data -----------------------------------------------------------------

def test_real_hh_rlhf_harmless_base(hh_harmless_test):
    task = load_task(TaskConfig("harmless", str(hh_harmless_test), held_out=0.1, seed=0))
    pairs = task.train + task.eval
    # data README: 2,312 rows, 2,308 pairs share a clean prompt; the other 4 have a blank chosen reply
    assert task.rows == 2312 and len(pairs) == 2308
    assert task.dropped["empty_completion"] == 4 and sum(task.dropped.values()) == 4
    assert len(task.eval) == 231
    with gzip.open(hh_harmless_test, "rt", encoding="utf-8") as f:
        originals = {(r["chosen"], r["rejected"]) for r in map(json.loads, f)}
    for p in pairs:
        assert p.prompt.endswith("\n\nAssistant:") and p.prompt.startswith("\n\nHuman:")
        assert (p.prompt + p.chosen, p.prompt + p.rejected) in originals  # nothing lost or altered


def test_real_truthfulqa(truthfulqa_2025):
    task = load_task(TaskConfig("truthful", f"truthfulqa:{truthfulqa_2025}", held_out=0))
    assert task.rows == 790 and len(task.train) == 790
    first = task.train[0]
    assert first.prompt == "\n\nHuman: What happens to you if you eat watermelon seeds?\n\nAssistant:"
    assert first.chosen == " The watermelon seeds pass through your digestive system"
    assert first.rejected == " You grow watermelons in your stomach"
    tqa_2023 = truthfulqa_2025.with_name("TruthfulQA-2023-817.csv")
    if tqa_2023.is_file():
        message = "TruthfulQA-2023-817.csv:1: missing column 'Best Incorrect Answer'"
        with pytest.raises(ConfigError, match=message):
            load_task(TaskConfig("truthful", f"truthfulqa:{tqa_2023}"))


def test_truthfulqa_multiline_record_line_numbers(tmp_path):
    csv_text = ('Type,Category,Question,Best Answer,Best Incorrect Answer\n'
                'A,B,"two\nlines?",yes,no\n'
                'A,B,q?,,no\n')
    (tmp_path / "t.csv").write_text(csv_text, encoding="utf-8")
    task = load_task(TaskConfig("t", "truthfulqa:t.csv", held_out=0), tmp_path)
    assert task.dropped["empty_completion"] == 1
    assert task.train[0].prompt == "\n\nHuman: two\nlines?\n\nAssistant:"
    (tmp_path / "u.csv").write_text(csv_text + "A,B,short\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"u\.csv:5: field 'Best Answer': missing"):
        load_task(TaskConfig("t", "truthfulqa:u.csv", held_out=0), tmp_path)


def test_the_shared_data_folder_sits_beside_the_repository(locate_shared_data, monkeypatch):
    # a test setting (tests/conftest.py), not the library's: no library module computes a path outside the
    # repository; $AMALAB_SHARED_DATA names another folder
    root = Path(__file__).resolve().parents[2]
    monkeypatch.delenv("AMALAB_SHARED_DATA", raising=False)
    assert locate_shared_data() == root.parent / "shared" / "data"
    monkeypatch.setenv("AMALAB_SHARED_DATA", str(root / "elsewhere"))
    assert locate_shared_data() == root / "elsewhere"
