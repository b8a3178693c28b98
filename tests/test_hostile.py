"""Issue 14: what a hostile afternoon of real use broke (data loss, two runs at once, stale publishes, errors a person
can act on). Each test failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import RECIPES, ROOT

CLI = [sys.executable, "-m", "finetune.cli"]


def cli(*args, cwd=None, env=None, timeout=600):
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=e, timeout=timeout)


# ---- 16: JSONL is split on "\n" only


def test_jsonl_rows_holding_line_separators_read_back_whole(tmp_path):
    from data_prep.jsonl import read_jsonl

    rows = [{"instruction": "a\u2028b", "output": "c\u2029d"}, {"instruction": "plain", "output": "e\x85f"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) > len(rows)  # the trap is really there: splitlines() breaks these rows
    assert read_jsonl(path) == rows


@pytest.mark.slow
@pytest.mark.slow
def test_real_rows_with_u2028_and_u2029_train_end_to_end(shared_datasets, tmp_path):
    """GSM8K train row 2382 holds U+2028 and PubMedQA 28177278 holds U+2029: prepared, trained, evaluated, merged."""
    gsm = (shared_datasets / "gsm8k/train.jsonl").read_text(encoding="utf-8").split("\n")
    (tmp_path / "gsm.jsonl").write_text("\n".join(gsm[2370:2400]) + "\n", encoding="utf-8")
    assert "\\u2028" in gsm[2381]
    pqa = json.loads((shared_datasets / "pubmedqa/ori_pqal.json").read_text(encoding="utf-8"))
    keys = ["28177278", *[k for k in pqa if k != "28177278"][:20]]
    (tmp_path / "pqa.json").write_text(json.dumps({k: pqa[k] for k in keys}, ensure_ascii=False), encoding="utf-8")
    assert "\u2029" in json.dumps(pqa["28177278"], ensure_ascii=False)
    sources = (f"[{{path: {tmp_path / 'gsm.jsonl'}, adapter: gsm8k, license: mit}}, "
               f"{{path: {tmp_path / 'pqa.json'}, adapter: pubmedqa, license: mit}}]")
    run = tmp_path / "run"
    r = cli("run", RECIPES / "math.yaml", "--smoke", "--run-dir", run, "--set", f"data.sources={sources}",
            "--set", "data.max_length=4096", "--set", "data.quality.pii.action=flag", "--set", "publish.gate.pii_flagged=false",
            "--set", "training.max_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    text = (run / "data/train.jsonl").read_text(encoding="utf-8") + (run / "data/val.jsonl").read_text(encoding="utf-8")
    assert "\u2028" in text or "\u2029" in text  # the characters reached the prepared rows and were read back
    assert json.loads((run / "manifest.json").read_text())["status"] == "done"


# ---- 1, 2: no command replaces a folder it did not make


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_data_build_never_replaces_a_users_folder_or_file(tmp_path):
    rows = [{"instruction": f"Question {i} about rule {i * 7}?", "output": f"Answer {i}: rule {i * 7} applies."} for i in range(40)]
    project = tmp_path / "project"
    project.mkdir()
    (project / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (project / "spec.yaml").write_text("name: mine\nsources: [{path: raw.jsonl}]\nmin_rows: 1\n")
    (project / "out.tmp").mkdir()  # a sibling the old build deleted as its staging folder
    (project / "out.tmp" / "keep.txt").write_text("mine")
    before = _snapshot(project)
    r = cli("data", "build", project / "spec.yaml", "--out", project, "--no-progress")
    assert r.returncode == 2 and "holds files finetune did not write (out.tmp, raw.jsonl, spec.yaml)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and _snapshot(project) == before
    (tmp_path / "afile").write_text("x")
    r = cli("data", "build", project / "spec.yaml", "--out", tmp_path / "afile", "--no-progress")
    assert r.returncode == 2 and "is a file" in r.stderr and (tmp_path / "afile").read_text() == "x"
    assert not (tmp_path / "afile.old").exists()
    # a new folder, then the same folder again (ours), both fine; the user's sibling survives
    out = project / "out"
    for _ in range(2):
        r = cli("data", "build", project / "spec.yaml", "--out", out, "--no-progress")
        assert r.returncode == 0, r.stderr
    assert (out / "train.jsonl").is_file() and (project / "out.tmp" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in project.iterdir()) == ["out", "out.tmp", "raw.jsonl", "spec.yaml"]


@pytest.mark.slow
def test_run_dir_holding_a_users_files_is_refused_before_a_byte_is_written(tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "recipe.yaml").write_text((RECIPES / "legal.yaml").read_text())
    (project / "data" / "notes.md").write_text("my notes")
    before = _snapshot(project)
    for args in (["run", project / "recipe.yaml", "--smoke", "--run-dir", "."], ["prepare", project / "recipe.yaml", "--smoke", "--run-dir", "."]):
        r = cli(*args, cwd=project)
        assert r.returncode == 2 and "holds files finetune did not write" in r.stderr, r.stderr[-2000:]
        assert _snapshot(project) == before and sorted(p.name for p in project.iterdir()) == ["data", "recipe.yaml"]
    r = cli("publish", project, cwd=project)
    assert r.returncode == 2 and "not a run directory" in r.stderr and _snapshot(project) == before
    r = cli("merge", "--base", "m", "--adapters", "a,b", "--out", project, cwd=project)
    assert r.returncode == 2 and "--out" in r.stderr and "holds files finetune did not write" in r.stderr and _snapshot(project) == before
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = cli("validate", RECIPES / "legal.yaml", "--smoke")
    assert r.returncode == 0
    r = cli("prepare", RECIPES / "legal.yaml", "--smoke", "--run-dir", afile)
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr and afile.read_text() == "x"


# ---- 3: one run at a time; concurrent publishes


@pytest.fixture(scope="module")
def legal_run(tmp_path_factory):
    """One finished legal smoke run (copied by the tests that change it)."""
    run = tmp_path_factory.mktemp("legal") / "run"
    r = cli("run", RECIPES / "legal.yaml", "--smoke", "--run-dir", run)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def copy_run(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest, symlinks=True)
    return dest


@pytest.mark.slow
def test_two_runs_on_one_directory_one_is_refused_naming_the_other(tmp_path):
    run = tmp_path / "run"
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen([*CLI, "run", str(RECIPES / "legal.yaml"), "--smoke", "--run-dir", str(run)], text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}))
        import time

        time.sleep(0.5)
    outs = [(p.wait(600), *p.communicate()) for p in procs]
    codes = sorted(o[0] for o in outs)
    assert codes == [0, 2], [o[2][-1500:] for o in outs]
    refused = next(o for o in outs if o[0] == 2)[2]
    assert "another finetune command is writing this run (pid" in refused and "Traceback" not in refused
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "done" and all(s["status"] == "done" for s in manifest["stages"].values())
    assert sorted(p.name for p in (run / "hub").iterdir() if p.name[0] != ".") == ["0001", "refs"]  # published once
    assert (run / ".finetune.lock").read_text() == ""  # released, holder cleared


@pytest.mark.slow
def test_a_lock_left_by_a_dead_process_is_named_and_taken_over(legal_run, tmp_path):
    run = copy_run(legal_run, tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (run / ".finetune.lock").write_text(json.dumps({"pid": int(dead), "host": "h", "command": "finetune run x", "since": "t"}))
    r = cli("eval", run, "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"pid {dead} on h, `finetune run x`, since t ended without releasing" in r.stderr


@pytest.mark.slow
def test_a_held_lock_refuses_every_writing_command(legal_run, tmp_path):
    run = copy_run(legal_run, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; from finetune.runlock import exclusive\n"
                               f"with exclusive(Path({str(run)!r}), 'holder'):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (["run", RECIPES / "legal.yaml", "--smoke", "--run-dir", run], ["publish", run, "--force"], ["eval", run, "--force"]):
            r = cli(*args)
            assert r.returncode == 2 and f"pid {holder.pid}" in r.stderr and "`holder`" in r.stderr, r.stderr[-1500:]
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_concurrent_publishes_to_one_folder_both_complete(legal_run, tmp_path):
    runs = [copy_run(legal_run, tmp_path / f"run{i}") for i in range(2)]
    target = tmp_path / "onprem"
    procs = [subprocess.Popen([*CLI, "publish", str(r), "--force", "--to", f"file://{target}"], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}) for r in runs]
    outs = [(p.wait(300), p.communicate()[1]) for p in procs]
    assert [o[0] for o in outs] == [0, 0], [o[1][-1500:] for o in outs]
    assert sorted(p.name for p in target.iterdir() if p.name[0] != ".") == ["0001", "0002", "refs"]
    for rev in ("0001", "0002"):
        meta = json.loads((target / rev / ".revision.json").read_text())
        assert "adapter_model.safetensors" in meta["files"] and (target / rev / "merged").is_dir()


# ---- 4: nothing stale is published


@pytest.mark.slow
def test_publish_after_a_re_prepare_with_other_data_is_refused_naming_the_stage(legal_run, tmp_path):
    run = copy_run(legal_run, tmp_path / "run")
    r = cli("prepare", RECIPES / "legal.yaml", "--smoke", "--run-dir", run, "--set", "data.val_fraction=0.3")
    assert r.returncode == 0, r.stderr[-2000:]
    before = sorted((run / "hub").iterdir())
    for args in (["publish", run, "--force"], ["eval", run, "--force"], ["merge", RECIPES / "legal.yaml", "--smoke", "--run-dir", run,
                                                                          "--set", "data.val_fraction=0.3", "--force", "merge"]):
        r = cli(*args)
        if args[0] == "merge":  # a stage command runs the stages before it: train reruns on the new data, so merge is current
            assert r.returncode == 0, r.stderr[-2000:]
            continue
        assert r.returncode == 2 and "refused, what it would read or ship is out of date: sft (changed since it ran" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
    assert sorted((run / "hub").iterdir()) == before


@pytest.mark.slow
def test_another_recipe_prepared_into_the_run_blocks_publishing_the_old_adapter(legal_run, tmp_path):
    run = copy_run(legal_run, tmp_path / "run")
    r = cli("prepare", RECIPES / "math.yaml", "--smoke", "--run-dir", run)
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("publish", run, "--force", "--to", f"file://{tmp_path / 'hub'}")
    assert r.returncode == 2 and "out of date: sft" in r.stderr and not (tmp_path / "hub").exists(), r.stderr[-2000:]


# ---- 5: combinations validate --what and --to; refs/main never moves to a revision without weights


def test_combination_publish_validates_options_and_needs_weights(tmp_path):
    from finetune.errors import StageFailed
    from finetune.publish import publish_file

    combo = tmp_path / "combo"
    combo.mkdir()
    (combo / "merge_check.json").write_text(json.dumps({"kind": "adapter_combination"}))
    for args, msg in (("--what adaptr --to".split() + [f"file://{tmp_path / 'hub'}"],
                       "--what 'adaptr': choose from adapter, merged, gguf (comma-separated); did you mean 'adapter'?"),
                      (["--to", "s3://bucket/x"], "--to 's3://bucket/x': must look like hf://ORG/NAME"),
                      (["--what", "adapter,gguf", "--to", f"file://{tmp_path / 'hub'}"], "a combination folder has none")):
        r = cli("publish", combo, *args)
        assert r.returncode == 2 and msg in r.stderr and "HF_TOKEN" not in r.stderr, r.stderr
    assert not (tmp_path / "hub").exists()
    hub = tmp_path / "hub2"
    publish_file("x", lambda d: (d.mkdir(parents=True), (d / "model.safetensors").write_bytes(b"w"), ["model.safetensors"])[-1], f"file://{hub}")
    with pytest.raises(StageFailed, match="nothing to publish holds weights"):
        publish_file("x", lambda d: (d.mkdir(parents=True), (d / "README.md").write_text("card"), ["README.md"])[-1], f"file://{hub}")
    assert (hub / "refs/main").read_text().strip() == "0001" and sorted(p.name for p in hub.iterdir()) == [".lock", "0001", "refs"]


# ---- 6: a moved run directory; relative publish targets


@pytest.mark.slow
def test_a_moved_run_publishes_and_generates_where_it_now_is(legal_run, tmp_path):
    moved = copy_run(legal_run, tmp_path / "elsewhere")
    old_hub = legal_run / "hub"
    before = sorted(p.name for p in old_hub.iterdir())
    r = cli("publish", moved, "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in old_hub.iterdir()) == before  # the old location is not written
    assert (moved / "hub/refs/main").read_text().strip() == "0002"
    r = cli("generate", moved, "--prompt", "Is hearsay admissible?", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr[-2000:]
    lock = json.loads((moved / "run.lock.json").read_text())
    assert all(not Path(s["path"]).is_absolute() for s in lock["sources"] if "path" in s)
    assert str(ROOT) not in (moved / "run.lock.json").read_text() and str(ROOT) not in (moved / "data/datacard.md").read_text()


def test_a_relative_file_target_is_relative_to_the_recipe(tmp_path):
    from finetune.recipe import load_recipe

    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "r.yaml").write_text((RECIPES / "legal.yaml").read_text().replace("samples/", str(RECIPES / "samples") + "/"))
    recipe, _ = load_recipe(folder / "r.yaml", ["publish.to=file://out/hub"])
    assert recipe.publish.to == f"file://{(folder / 'out/hub').resolve()}"


# ---- 17: a stage's fingerprint holds only what that stage reads


@pytest.mark.slow
def test_changing_how_a_task_is_scored_reruns_eval_only(legal_run, tmp_path):
    run = copy_run(legal_run, tmp_path / "run")
    r = cli("run", RECIPES / "legal.yaml", "--smoke", "--run-dir", run, "--set", "eval.tasks.0.max_samples=3",
            "--set", "eval.tasks.0.num_fewshot=1")
    assert r.returncode == 0, r.stderr[-2000:]
    said = {line.split()[0]: line.split()[1] for line in r.stderr.splitlines() if line.split()[:1] and line.split()[0] in
            ("prepare", "sft", "eval", "merge", "card", "publish") and len(line.split()) == 2}
    assert said == {"prepare": "skipped", "sft": "skipped", "eval": "ran", "merge": "skipped", "card": "ran", "publish": "ran"}, r.stderr[-2000:]
    # and a change to what decontamination reads (the task's rows) does rebuild the data
    r = cli("prepare", RECIPES / "legal.yaml", "--smoke", "--run-dir", run, "--set", "eval.tasks.0.limit=2")
    assert r.returncode == 0 and "prepare  ran" in r.stderr, r.stderr[-2000:]


# ---- 19: the regression gate reads the interval, not the point estimate


def test_regression_gate_needs_the_whole_interval_past_the_threshold():
    from finetune.publish import regressions

    def report(base, tuned, ci, higher=True):
        return {"tasks": [{"name": "t", "metric": "m", "n": 20, "higher_is_better": higher, "base": {"score": base},
                           "tuned": {"score": tuned}, "delta_ci95": ci}]}

    # the case: one item of 20 worse, delta -5 points [-15, 0]: noise, not a regression
    assert regressions(report(0.60, 0.55, [-0.15, 0.0]), 0.02) == []
    # the same point estimate with a tight interval is a regression
    assert regressions(report(0.60, 0.55, [-0.07, -0.03]), 0.02)
    assert regressions(report(0.60, 0.55, [-0.07, -0.03]), 0.03) == []  # at least 0.03 worse is not more than 0.03
    # perplexity: relative, lower is better; the interval's lower end must be a rise beyond the threshold
    assert regressions(report(10.0, 10.5, [-0.1, 1.1], higher=False), 0.02) == []
    assert regressions(report(10.0, 10.5, [0.3, 0.7], higher=False), 0.02)


# ---- 8: validate says what the run would fail on


@pytest.mark.parametrize("sets, message", [
    (["data.sources=[{path: samples/legal.jsonn, license: mit}]"], "data.sources.0.path: samples/legal.jsonn (did you mean 'legal.jsonl'?)"),
    (["training.learning_rate=inf"], "training.learning_rate: Input should be a finite number"),
    (["training.max_steps=0"], "training.max_steps: give a number of optimizer steps (1 or more), or -1"),
    (["eval.tasks.0.path=samples/nothere.tsv", "eval.tasks.0.hub=null"], "eval.tasks.0.path: samples/nothere.tsv"),
])
def test_validate_refuses_what_would_fail_at_run_time(sets, message):
    r = cli("validate", RECIPES / "legal.yaml", *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_duplicate_keys_and_recursive_aliases_are_refused(tmp_path):
    text = (RECIPES / "legal.yaml").read_text()
    (tmp_path / "dup.yaml").write_text(text.replace("\ndomain:", "\nname: other\ndomain:", 1))
    first = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("name:"))
    second = next(i for i, line in enumerate((tmp_path / "dup.yaml").read_text().splitlines(), 1) if line.startswith("name: other"))
    r = cli("validate", tmp_path / "dup.yaml")
    assert r.returncode == 2 and f"key 'name' is given twice, on lines {first} and {second}" in r.stderr, r.stderr
    (tmp_path / "rec.yaml").write_text("name: x\nbase_model: &b\n  id: m\n  extra: *b\n")
    r = cli("validate", tmp_path / "rec.yaml")
    assert r.returncode == 2 and "recursive" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_one_row_after_cleaning_is_refused_with_the_reason(tmp_path):
    rows = [{"instruction": "What is consideration in contract law?", "output": "Something of value exchanged."}] * 39
    rows.append({"instruction": "Define tort.", "output": "A civil wrong."})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = cli("run", RECIPES / "legal.yaml", "--smoke", "--run-dir", tmp_path / "run", "--set", f"data.sources=[{{path: {tmp_path / 'd.jsonl'}, license: mit}}]")
    assert r.returncode == 2 and "fewer than data.min_rows=8" in r.stderr and "38 exact duplicate" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run/adapter").exists()


@pytest.mark.slow
def test_truncate_applies_the_reject_rate_like_drop(tmp_path):
    r = cli("run", RECIPES / "legal.yaml", "--smoke", "--run-dir", tmp_path / "run", "--set", "data.overlong=truncate",
            "--set", "data.max_length=40", "--set", "data.quality.max_reject_rate=0.1")
    assert r.returncode == 2 and "could not be encoded within max_length 40" in r.stderr and "overlong: truncate" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_a_node_rank_outside_the_nodes_is_refused_at_once(tmp_path):
    r = cli("run", RECIPES / "legal.yaml", "--smoke", "--run-dir", tmp_path / "run", "--gpus", "2", "--nodes", "2", "--node-rank", "5",
            "--main-address", "127.0.0.1", timeout=60)
    assert r.returncode == 2 and "--node-rank 5: node ranks run from 0 to --nodes - 1 (1)" in r.stderr
    assert not (tmp_path / "run").exists()


# ---- 7: one line a person can act on; the traceback only with --debug or in the log


@pytest.mark.slow
def test_a_full_disk_says_one_line_and_the_manifest_keeps_the_real_error(legal_run, tmp_path):
    run = copy_run(legal_run, tmp_path / "run")
    # the disk fills while eval writes: one line naming the path, exit 1, the manifest write does not hide it
    script = ("import errno, sys\nfrom finetune import harness\n"
              "def full(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device', str(a[0]))\n"
              "harness.write_report = full\nimport finetune.evaluate as ev; ev.write_report = full\n"
              "from finetune.cli import main\nsys.argv = ['finetune', 'eval', sys.argv[1], '--force']\nmain()\n")
    r = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 1, r.stderr[-2000:]
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "no space left on the device; free space" in err[0] and "details in" in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "Traceback" in (run / "logs/run.log").read_text()  # kept for whoever debugs it
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["eval"]["status"] == "failed" and "No space left" in manifest["stages"]["eval"]["error"]


def test_permission_errors_name_the_path_and_debug_prints_the_traceback(tmp_path):
    script = ("import errno, sys\nimport finetune.pipeline as p\n"
              "def ro(self): raise PermissionError(errno.EROFS, 'Read-only file system', str(self.root))\n"
              "p.RunDir.claim = ro\nfrom finetune.cli import main\nsys.argv = ['finetune', *sys.argv[1:]]\nmain()\n")
    for debug in ([], ["--debug"]):
        r = subprocess.run([sys.executable, "-c", script, *debug, "prepare", str(RECIPES / "legal.yaml"), "--smoke", "--run-dir",
                            str(tmp_path / "ro")], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 2 and f"error: {tmp_path / 'ro'}: read-only file system; choose a folder" in r.stderr, r.stderr[-2000:]
        assert ("Traceback" in r.stderr) == bool(debug)


@pytest.mark.slow
def test_unexpected_errors_print_one_line_and_smoke_reads_odd_sample_files(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "bin.jsonl").write_bytes(bytes(range(256)) * 4)
    (samples / "latin.jsonl").write_bytes('{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1") * 30)
    (samples / "folder.jsonl").mkdir()
    for name in ("bin.jsonl", "latin.jsonl", "folder.jsonl"):
        r = cli("run", RECIPES / "legal.yaml", "--smoke", "--run-dir", tmp_path / f"run-{name}", "--set", f"samples.data={samples / name}")
        assert r.returncode == 2, (name, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and len([l for l in r.stderr.splitlines() if l.startswith("error:")]) == 1, r.stderr[-2000:]


def test_teacher_unreachable_and_png_into_a_new_folder(tmp_path, shared_datasets):
    r = cli("data", "synth", "self-instruct", "--seeds", shared_datasets / "alpaca/seed_tasks.jsonl", "--teacher", "http://127.0.0.1:9/v1",
            "--model", "m", "--out", tmp_path / "s.jsonl", "--num", "1", "--retries", "0", timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "Connection refused" in r.stderr, r.stderr[-2000:]
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = cli("data", "stats", tmp_path / "d.jsonl", "--png", tmp_path / "new/folder/h.png")
    assert r.returncode == 0 and (tmp_path / "new/folder/h.png").read_bytes()[:4] == b"\x89PNG", r.stderr[-2000:]


# ---- 9: blame the right place; fail fast


@pytest.mark.slow
def test_bad_set_and_to_name_the_option_not_the_recipe(legal_run, tmp_path):
    r = cli("run", RECIPES / "legal.yaml", "--smoke", "--run-dir", tmp_path / "r", "--set", "training.learning_rate=fast")
    assert r.returncode == 2 and "--set: invalid value" in r.stderr and "[from --set training.learning_rate=fast]" in r.stderr, r.stderr
    r = cli("publish", legal_run, "--to", "ftp://x")
    assert r.returncode == 2 and "--to 'ftp://x'" in r.stderr and "recipe.yaml" not in r.stderr, r.stderr


def test_generate_chat_and_merge_check_arguments_before_loading_torch(tmp_path):
    probe = ("import sys, runpy\nsys.argv = ['finetune', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('finetune.cli', run_name='__main__')\nexcept SystemExit as e:\n"
             "    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n    raise\n")
    (tmp_path / "a").mkdir()
    for args, msg in ((["generate", tmp_path, "--prompt", "x"], "not a run directory"), (["chat", tmp_path], "not a run directory"),
                      (["merge", "--base", "m", "--adapters", f"{tmp_path / 'a'},{tmp_path / 'a'}", "--weights", "1", "--out", tmp_path / "o"],
                       "--weights: 1 weights for 2 adapters")):
        r = subprocess.run([sys.executable, "-c", probe, *map(str, args)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 2 and msg in r.stderr and r.stderr.strip().endswith("NO-TORCH"), r.stderr[-1500:]


# ---- 14: chat


def test_chat_commands_are_never_sent_and_ctrl_c_stops_only_the_answer():
    import io

    from finetune.chat import chat

    class Recipe:
        name, domain = "r", "legal"

        class data:
            template, system_prompt = "alpaca", None

    sent = []

    def streamer(model, tok, prompt, max_new, temp, write):
        sent.append(prompt)
        write("partial")
        if len(sent) == 1:
            raise KeyboardInterrupt  # Ctrl-C during the first answer
        write(" answer")
        return "partial answer"

    out = io.StringIO()
    taken = chat(None, 8, 0.0, inp=io.StringIO("/help\nfirst\n/reset\n/hepl\nsecond\n/exit\nnever\n"), out=out,
                 loaded=(None, None, Recipe()), streamer=streamer)
    text = out.getvalue()
    assert taken == 2 and len(sent) == 2  # /help, /reset, /hepl never reached the model; the session went on after Ctrl-C
    assert "/reset    forget the conversation" in text and "(conversation cleared)" in text and "partial [stopped]" in text
    assert "unknown command /hepl; did you mean /help?" in text
    assert "first" not in sent[1]  # /reset forgot the first turn


# ---- 15: help and console output


@pytest.mark.slow
def test_help_output_is_plain_and_each_line_said_once(legal_run, tmp_path):
    from typer.testing import CliRunner

    from finetune.cli import app

    runner = CliRunner()
    commands = [["run"], ["prepare"], ["train"], ["sft"], ["cpt"], ["merge"], ["eval"], ["generate"], ["chat"], ["publish"], ["validate"],
                ["data", "build"], ["data", "validate"], ["data", "stats"], ["data", "synth", "self-instruct"], ["data", "synth", "grounded"]]
    for cmd in commands:
        out = runner.invoke(app, [*cmd, "--help"], terminal_width=100)
        assert out.exit_code == 0, (cmd, out.output)
        first = out.output.splitlines()[0]
        assert "<bool>" not in out.output and "<list" not in out.output and "<path>" not in out.output and "{" not in first, (cmd, out.output)
    cpt = runner.invoke(app, ["cpt", "--help"], terminal_width=100).output
    assert "[cpt, sft]" in cpt and "cpt [OPTIONS] RECIPE" in cpt
    prep = runner.invoke(app, ["prepare", "--help"], terminal_width=100).output
    assert not any(o in prep for o in ("--gpus", "--allow-drift", "--show-example")) and "--set KEY=VALUE" in prep
    # skipped stages are said once each
    r = cli("run", RECIPES / "legal.yaml", "--smoke", "--run-dir", copy_run(legal_run, tmp_path / "run"))
    assert r.returncode == 0 and sum("prepare" in line for line in r.stderr.splitlines()) == 1, r.stderr
    # validate --preflight says its result once
    r = cli("validate", RECIPES / "legal.yaml", "--smoke", "--preflight")
    assert r.returncode == 0 and (r.stdout + r.stderr).count("samples passed") == 1, r.stdout + r.stderr
    # a clean stop is not an error
    script = ("import sys\nimport finetune.pipeline as p\nfrom finetune.preempt import Preempted\n"
              "def stop(*a, **k): raise Preempted('train: stopped at step 3 after a checkpoint; run the same command to continue')\n"
              "p.run_stages = stop\nfrom finetune.cli import main\nsys.argv = ['finetune', *sys.argv[1:]]\nmain()\n")
    r = subprocess.run([sys.executable, "-c", script, "run", str(RECIPES / "legal.yaml"), "--smoke", "--run-dir", str(tmp_path / "s")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 143 and "stopped: train: stopped at step 3" in r.stderr and "error:" not in r.stderr, r.stderr


def test_the_package_metadata_builds_without_setuptools_warnings():
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), str(ROOT / "pyproject.toml"))
    assert not [w for w in caught if "license" in str(w.message).lower()], [str(w.message)[:200] for w in caught]
    assert dist.metadata.license_expression == "Apache-2.0"


# ---- 10: numbers that do not mislead


class Constant:
    """Always answers `label`: the predictor that scored 100.0 [100.0, 100.0] on hearsay's first 20 rows."""

    def __init__(self, label):
        self.label = label

    def loglikelihood(self, requests):
        return [0.0 if c.strip().lower() == self.label.lower() else -10.0 for _, c in requests]


@pytest.mark.parametrize("name,labels,const", [("hearsay", ["Yes", "No"], "No"),
                                               ("abercrombie", ["generic", "descriptive", "suggestive", "arbitrary", "fanciful"], "generic")])
def test_max_samples_is_a_seeded_stratified_sample(shared_datasets, name, labels, const):
    import csv
    from collections import Counter

    from finetune.harness import score_items, task_entry
    from finetune.tasks import EvalTask, load_items, normalise_label

    d = shared_datasets / "legalbench_prerelease" / name
    with open(d / "test.tsv", encoding="utf-8", newline="") as f:
        file_labels = [normalise_label(r["label"]) for r in csv.DictReader(f, delimiter="\t")]
    k = 20 if name == "hearsay" else 50
    # the trap: the file is sorted by label, so its first k rows miss classes (hearsay's first 20 hold one)
    assert len(set(file_labels[:k])) < len(set(file_labels)) and (name != "hearsay" or len(set(file_labels[:k])) == 1)
    task = EvalTask(name=name, type="classification", path=str(d / "test.tsv"), prompt_file=str(d / "base_prompt.txt"), labels=labels,
                    max_samples=k)
    info: dict = {}
    items = load_items(task, shared_datasets, info=info)
    again = load_items(task, shared_datasets)
    assert [it.id for it in items] == [it.id for it in again]  # seeded: the same items every time
    got = Counter(labels[it.gold].lower() for it in items)
    whole = Counter(file_labels)
    assert len(items) == k and set(got) == set(whole)  # every class present
    for lab, n in whole.items():  # each class gets its share of the sample, within one item
        assert abs(got[lab] - k * n / len(file_labels)) <= 1, (lab, got, whole)
    assert info["method"] == "seeded sample stratified by gold label" and info["scored"] == k and info["of"] == len(file_labels)
    entry = task_entry(task, score_items(Constant(const), task, items), None, "x")
    assert entry["base"]["score"] == pytest.approx(1 / len(labels))  # a constant predictor is at chance, as it should be
    other = load_items(task.model_copy(update={"sample_seed": 7}), shared_datasets)
    assert [it.id for it in other] != [it.id for it in items]


def test_one_gold_class_is_warned_and_no_zero_width_interval_is_printed(tmp_path):
    from finetune.harness import report_markdown, score_items, task_entry
    from finetune.tasks import EvalTask, load_items

    (tmp_path / "t.tsv").write_text("label\ttext\n" + "".join(f"No\tcase {i}\n" for i in range(12)))
    task = EvalTask(name="t", type="classification", path=str(tmp_path / "t.tsv"), labels=["Yes", "No"])
    items = load_items(task, tmp_path)
    entry = task_entry(task, score_items(Constant("No"), task, items), None, "x")
    assert entry["base"]["score"] == 1.0 and entry["base"]["ci95"][0] == entry["base"]["ci95"][1]
    assert "same gold answer ('no')" in entry["warnings"][0]
    md = report_markdown({"tasks": [entry]})
    assert "[no interval: one gold class in the scored items]" in md and "[100.0, 100.0]" not in md and "**Warning** t:" in md


# ---- 18: what is published is what is evaluated


@pytest.mark.slow
def test_the_merged_model_is_scored_beside_the_adapter_and_gated_on_its_own_column(legal_run):
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.publish import regressions

    report = json.loads((legal_run / "eval/report.json").read_text())
    items = {t["name"]: [json.loads(l) for l in (legal_run / f"eval/items/{t['name']}.jsonl").read_text().splitlines()] for t in report["tasks"]}
    for t in report["tasks"]:
        assert {"base", "tuned", "merged", "merged_delta", "merged_delta_ci95"} <= t.keys()
        assert all("merged" in it for it in items[t["name"]])
    # the merged column is RUN/merged scored as a plain model: recompute the held-out perplexity from the saved weights
    rows = [json.loads(l) for l in (legal_run / "data/val.jsonl").read_text().splitlines()]
    recipe = yaml_load(legal_run / "recipe.yaml")
    model = AutoModelForCausalLM.from_pretrained(legal_run / "merged", dtype=getattr(torch, recipe["merge"]["dtype"])).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids, labels = torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])
            logits = model(input_ids=ids).logits.float()[:, :-1]
            tgt = labels[:, 1:]
            mask = tgt != -100
            lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll -= lp[mask].sum().item()
            count += mask.sum().item()
    held = next(t for t in report["tasks"] if t["name"] == "heldout")
    assert held["merged"]["score"] == pytest.approx(float(torch.tensor(nll / count).exp()), rel=1e-3)
    assert held["merged"]["score"] != held["tuned"]["score"]  # not a copy of the adapter's column: another model
    # the gate judges each published artifact by its own column
    fake = {"tasks": [{**held, "higher_is_better": True, "base": {"score": 0.6}, "tuned": {"score": 0.6}, "merged": {"score": 0.5},
                       "delta_ci95": [-0.01, 0.01], "merged_delta_ci95": [-0.15, -0.05]}]}
    assert regressions(fake, 0.02, ["adapter"]) == []
    assert [r.split(":")[0] for r in regressions(fake, 0.02, ["adapter", "merged"])] == ["heldout (merged model)"]
    md = (legal_run / "eval/report.md").read_text()
    assert "merged (published)" in md and "tuned (adapter)" in md


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_chat_and_generate_use_the_published_model_unless_asked(legal_run):
    r = cli("generate", legal_run, "--prompt", "Define hearsay.", "--max-new-tokens", "3")
    assert r.returncode == 0 and "model: the merged model" in r.stderr, r.stderr[-1500:]
    r = cli("generate", legal_run, "--prompt", "Define hearsay.", "--max-new-tokens", "3", "--use", "adapter")
    assert r.returncode == 0 and "model: the base as trained with the adapter" in r.stderr, r.stderr[-1500:]


# ---- 11, 20: the card describes what it ships, with no local path


@pytest.mark.slow
def test_card_load_instructions_licence_datasets_and_base_name(legal_run, tmp_path):
    import yaml

    from finetune.card import front_matter

    run = copy_run(legal_run, tmp_path / "run")
    hub = tmp_path / "hub"
    r = cli("publish", run, "--force", "--to", f"file://{hub}")
    assert r.returncode == 0, r.stderr[-1500:]
    card = (hub / "0001/README.md").read_text()
    front = front_matter(card)
    assert 'AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")' in card and 'subfolder="merged"' in card
    assert '"REPO"' not in card
    from finetune.card import how_to_load

    hub_text = "\n".join(how_to_load("hf://acme/legal-saul", ["adapter", "merged"], "m"))
    assert 'AutoPeftModelForCausalLM.from_pretrained("acme/legal-saul")' in hub_text
    assert 'AutoModelForCausalLM.from_pretrained("acme/legal-saul", subfolder="merged")' in hub_text
    # front matter and text agree on the licence
    assert front["license"] == "other" and front["license_name"] == "apache-2.0-and-mit"
    assert "Licence `other` (named `apache-2.0-and-mit`)" in card
    types = {res["task"]["name"]: res["dataset"]["type"] for res in front["model-index"][0]["results"]}
    assert types["heldout"] == "heldout" and "validation split" not in types.values()
    metric_names = {m["name"] for res in front["model-index"][0]["results"] for m in res["metrics"]}
    assert {"perplexity (base)", "perplexity (tuned)", "perplexity (merged)"} <= metric_names
    # the base is named by its public name in the card and in the published adapter's config; never a local path
    cfg = json.loads((hub / "0001/adapter_config.json").read_text())
    assert front["base_model"] == cfg["base_model_name_or_path"] == "finetune-smoke/tiny-mistral"
    datacard = (run / "data/datacard.md").read_text()
    assert "of `finetune-smoke/tiny-mistral`" in datacard and "recipe tokenizer" not in datacard
    for text in (card, datacard, (hub / "0001/run.lock.json").read_text(), (hub / "0001/adapter_config.json").read_text()):
        assert str(tmp_path) not in text and str(ROOT) not in text
    # a real recipe with a local base folder: the card names base_model.hub_id
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["base_model"]["id"] == "$RUN/base"


def test_a_local_base_folder_is_published_under_its_hub_id(tmp_path):
    from finetune.pipeline import Context
    from finetune.recipe import load_recipe
    from finetune.run import RunDir
    from finetune.stages import public_base

    base = tmp_path / "models" / "Saul-7B"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    recipe, d = load_recipe(RECIPES / "legal.yaml", [f"base_model.id={base}"])
    assert public_base(Context(recipe, d, RunDir(tmp_path / "r"))) == "Saul-7B"  # no Hub id known: the folder's name, not its path
    (base / "config.json").write_text(json.dumps({"model_type": "mistral", "_name_or_path": "Equall/Saul-7B-Instruct-v1"}))
    assert public_base(Context(recipe, d, RunDir(tmp_path / "r"))) == "Equall/Saul-7B-Instruct-v1"
    recipe, d = load_recipe(RECIPES / "legal.yaml", [f"base_model.id={base}", "base_model.hub_id=acme/saul-internal"])
    assert public_base(Context(recipe, d, RunDir(tmp_path / "r"))) == "acme/saul-internal"


# ---- 13: progress on a terminal and in logs


@pytest.mark.slow
def test_training_progress_is_logged_off_a_terminal_and_redrawn_on_one(legal_run, tmp_path):
    import io

    from finetune.progress import Progress

    run = copy_run(legal_run, tmp_path / "run")
    r = cli("train", RECIPES / "legal.yaml", "--smoke", "--run-dir", run, "--force", "train", "--set", "training.logging_steps=5")
    assert r.returncode == 0, r.stderr[-1500:]
    lines = [l for l in r.stderr.splitlines() if "train: step" in l]
    assert [l.split("step ")[1].split(" ")[0] for l in lines] == ["5/20", "10/20", "15/20", "20/20"], r.stderr[-2000:]
    assert all("loss " in l and "ETA" in l for l in lines) and "tokens/s" in lines[-1]
    assert sum("train: step" in l for l in (run / "logs/run.log").read_text().splitlines()) >= 4  # in the log file too

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = Progress("train", 4, "step", every=2, stream=out)
    for step in range(1, 5):
        bar.update(step, loss="1.0")
    bar.close()
    text = out.getvalue()
    assert text.count("\r\033[K") == 4 and "step 4/4 (100%)" in text and text.endswith("\n")  # one line, redrawn in place


# ---- 9: the Hub unreachable is said once


def test_an_unreachable_hub_is_one_message_and_a_cached_run_goes_offline(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    r = subprocess.run([*CLI, "run", str(RECIPES / "legal.yaml"), "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "the Hugging Face Hub (http://127.0.0.1:9) cannot be reached" in errors[0], r.stderr[-2000:]
    assert "model Equall/Saul-7B-Instruct-v1" in errors[0] and "--smoke" in errors[0]
    assert "Retrying" not in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "run").exists()
    r = subprocess.run([*CLI, "validate", str(RECIPES / "legal.yaml")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "cannot be reached" in r.stderr  # validate says it, and still validates

    # everything in the local cache: one warning, then offline
    import huggingface_hub.constants as hc

    from finetune import hub
    from finetune.recipe import load_recipe

    recipe, _ = load_recipe(RECIPES / "legal.yaml")
    cache = tmp_path / "hub-cache"
    for kind, repo, rev in hub.hub_refs(recipe):
        if kind == "model":
            snap = cache / f"models--{repo.replace('/', '--')}"
            (snap / "refs").mkdir(parents=True)
            (snap / "refs/main").write_text("0" * 40)
            (snap / "snapshots" / ("0" * 40)).mkdir(parents=True)
            (snap / "snapshots" / ("0" * 40) / "config.json").write_text("{}")
        else:
            (cache / f"datasets--{repo.replace('/', '--')}").mkdir(parents=True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    hub.check_hub(recipe)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hc.HF_HUB_OFFLINE is True
    (cache / f"datasets--{'isaacus/open-australian-legal-qa'.replace('/', '--')}").rmdir()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(hub.HubUnreachable, match="dataset isaacus/open-australian-legal-qa"):
        hub.check_hub(recipe)


def test_report_chart_uses_percent_like_the_tables(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from finetune.harness import report_png

    seen = {}
    original_ylim = Axes.set_ylim
    monkeypatch.setattr(Axes, "set_ylim", lambda self, *a, **k: (seen.__setitem__("ylim", a), original_ylim(self, *a, **k))[1])
    heights = []
    original_bar = Axes.bar
    monkeypatch.setattr(Axes, "bar", lambda self, x, h, *a, **k: (heights.append(h), original_bar(self, x, h, *a, **k))[1])
    task = {"name": "t", "metric": "accuracy", "n": 10, "higher_is_better": True, "base": {"score": 0.2, "ci95": [0.05, 0.5]},
            "tuned": {"score": 0.4, "ci95": [0.17, 0.69]}, "merged": {"score": 0.4, "ci95": [0.17, 0.69]}}
    report_png({"tasks": [task]}, tmp_path / "r.png")
    assert seen["ylim"] == (0, 100) and heights == [pytest.approx(20.0), pytest.approx(40.0), pytest.approx(40.0)]


def test_a_normal_run_with_local_files_reevaluates_from_its_own_folder(smoke_runs, tmp_path):
    """Paths are resolved once, at load: RUN/recipe.yaml holds them absolute, so `finetune eval RUN_DIR` works from any
    directory after the recipe's own folder is gone (a recipe written to a temporary folder, a moved checkout).
    A normal run (not --smoke): the base is a local model folder, the data and the eval task local files."""
    import yaml

    base = smoke_runs["legal"][0] / "base"
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    shutil.copy(RECIPES / "samples/legal.jsonl", proj / "data/train.jsonl")
    shutil.copy(RECIPES / "samples/legal_eval.jsonl", proj / "data/eval.jsonl")
    (proj / "recipes").mkdir()
    recipe = {"name": "local-legal", "domain": "legal",
              "base_model": {"id": str(base), "family": "mistral", "license": "apache-2.0"},
              "data": {"sources": [{"path": "../data/train.jsonl", "format": "alpaca", "license": "apache-2.0"}]},
              "quantization": {"bits": 16}, "lora": {"r": 4, "lora_alpha": 8},
              "training": {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "optim": "adamw_torch"},
              "eval": {"heldout": False, "tasks": [{"name": "legal-eval", "type": "perplexity", "path": "../data/eval.jsonl"}]},
              "merge": {"enabled": False}, "publish": {"to": None}}
    (proj / "recipes/r.yaml").write_text(yaml.safe_dump(recipe))
    run = tmp_path / "run"
    r = cli("run", "recipes/r.yaml", "--run-dir", run, cwd=proj, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    copy = yaml.safe_load((run / "recipe.yaml").read_text())
    assert copy["data"]["sources"][0]["path"] == str((proj / "data/train.jsonl").resolve())
    assert copy["eval"]["tasks"][0]["path"] == str((proj / "data/eval.jsonl").resolve())
    shutil.rmtree(proj / "recipes")  # the folder the relative paths were relative to
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = cli("eval", run, "--force", cwd=elsewhere, env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((run / "eval/report.json").read_text())
    assert [t["name"] for t in report["tasks"]] == ["legal-eval"] and report["tasks"][0]["n"] > 0
