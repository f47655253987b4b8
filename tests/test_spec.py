"""Job file parsing: every bad field is named, with the fix, before any model loads."""

from __future__ import annotations

import pytest

from lepton_batch.job.settings import Settings
from lepton_batch.job.spec import JobSpecError, load_job
from lepton_batch.plan.fingerprint import job_fingerprint

GOOD = """
name: t
input: {path: data/, text_column: text, id_column: id}
model: {path: /models/x}
task: {kind: embed}
output: {path: out/}
"""


def _load(tmp_path, text: str, overrides=None):
    f = tmp_path / "job.yaml"
    f.write_text(text)
    return load_job(f, overrides)


def test_good_job_gets_defaults(tmp_path):
    job = _load(tmp_path, GOOD)
    assert job.input.rows_per_shard == 20_000
    assert job.engine.max_tokens_per_batch is None  # device default, resolved by the engine
    assert job.output.mode == "resume"
    assert job.cluster.address is None and job.cluster.dashboard_address.startswith("127.0.0.1")
    assert job.model.trust_remote_code is False


BAD = [
    # (job text, overrides, the field the message must name, a phrase of the fix)
    (GOOD.replace("text_column", "text_colum"), [], "input.text_colum",
     "did you mean 'text_column'"),
    (GOOD.replace("kind: embed", "kind: embedd"), [], "task.kind", "'embed'"),
    (GOOD.replace("{path: /models/x}", "{path: /models/x, dtype: fp8}"), [], "model.dtype",
     "float16"),
    (GOOD.replace("output: {path: out/}", "output: {path: out/, mode: append}"), [],
     "output.mode", "overwrite"),
    (GOOD.replace("name: t", "name: 'bad name/..'"), [], "name", "pattern"),
    (GOOD.replace("output: {path: out/}\n", ""), [], "output", "required"),
    (GOOD, ["input.rows_per_shard=0"], "input.rows_per_shard", "greater than 0"),
    (GOOD, ["task.labels=[a, b]"], "task", "labels only apply to kind: classify"),
    (GOOD, ["task.kind=classify", "task.labels=[a, b]", "task.top_k=3"], "task",
     "only 2 labels"),
    (GOOD, ["modle.path=/x"], "modle", "did you mean 'model'"),
    (GOOD, ["cluster.n_wokers=2"], "cluster.n_wokers", "did you mean 'n_workers'"),
    (GOOD.replace("id_column: id", "id_column: text"), [], "input.text_column and input.id_column",
     "must differ"),
    (GOOD, ["engine.max_tokens_per_batch=lots"], "engine.max_tokens_per_batch", "integer"),
    # generate: do_sample false with a sampling field names both (issue 28, bug 4)
    (GOOD, ["task.kind=generate", "task.do_sample=false", "task.temperature=0.7"], "task",
     "do_sample: false is greedy decoding, but temperature only applies when sampling"),
    (GOOD, ["task.kind=generate", "task.do_sample=false", "task.top_p=0.9", "task.top_k=5"],
     "task", "but top_p, top_k only apply"),
    (GOOD, ["task.kind=generate", "task.temperature=0", "task.do_sample=true"], "task",
     "temperature: 0 is greedy decoding"),
    (GOOD, ["task.kind=generate", "task.temperature=-1"], "task.temperature",
     "greater than or equal to 0"),
    # zero-shot scores
    (GOOD, ["task.label_template=This is {}."], "task", "apply to kind: classify with labels"),
    (GOOD, ["task.kind=classify", "task.labels=[a, b]", "task.label_template=About {x}"],
     "task", "label_template must hold the label as {} exactly once"),
    (GOOD, ["task.kind=classify", "task.labels=[a, b]", "task.softmax_temperature=0.1"],
     "task", "softmax_temperature applies to scores: softmax"),
    (GOOD, ["task.kind=classify", "task.labels=[a, b]", "task.scores=probs"], "task.scores",
     "'cosine' or 'softmax'"),
    (GOOD, ["task.min_score=0.3"], "task", "min_score applies to kind: classify"),
]


@pytest.mark.parametrize(("text", "overrides", "field", "fix"), BAD)
def test_bad_job_names_the_field(tmp_path, text, overrides, field, fix):
    with pytest.raises(JobSpecError) as exc:
        _load(tmp_path, text, overrides)
    message = str(exc.value)
    assert field in message
    assert fix in message


def test_all_problems_reported_at_once(tmp_path):
    text = GOOD.replace("text_column", "txt").replace("kind: embed", "kind: nope")
    with pytest.raises(JobSpecError) as exc:
        _load(tmp_path, text)
    assert len(exc.value.problems) == 2
    assert "input.txt" in str(exc.value) and "task.kind" in str(exc.value)


def test_errors_print_the_problem_not_the_job(tmp_path):
    """A check across sections names its fields; neither it nor a bad section echoes the
    whole job or section back."""
    with pytest.raises(JobSpecError) as exc:  # (Delta accepts every mode now: tombstones)
        _load(tmp_path, GOOD, ["output.tombstones=true", "output.mode=overwrite"])
    (problem,) = exc.value.problems
    assert problem.startswith("output.tombstones") and "mode: incremental" in problem
    assert "{" not in problem and "/models/x" not in problem
    with pytest.raises(JobSpecError) as exc:
        _load(tmp_path, GOOD, ["task.labels=[a, b]"])
    assert "kind: classify" in str(exc.value) and "'kind'" not in str(exc.value)
    with pytest.raises(JobSpecError, match=r"got 'fp8'"):  # a scalar is still shown
        _load(tmp_path, GOOD, ["model.dtype=fp8"])


def test_yaml_is_loaded_safely(tmp_path):
    # A Python object tag would run code under yaml.load; safe_load refuses it.
    with pytest.raises(JobSpecError, match="not valid YAML"):
        _load(tmp_path, GOOD + "evil: !!python/object/apply:os.system ['true']\n")


def test_not_a_mapping_and_missing_file(tmp_path):
    with pytest.raises(JobSpecError, match="top level must be a mapping"):
        _load(tmp_path, "- a\n- b\n")
    with pytest.raises(JobSpecError, match="no such file"):
        load_job(tmp_path / "missing.yaml")


def test_overrides_parse_yaml_values(tmp_path):
    job = _load(tmp_path, GOOD, ["task.kind=classify", "task.labels=[x, y, z]", "task.top_k=2",
                                 "cluster.address=tcp://10.0.0.1:8786"])
    assert job.task.labels == ["x", "y", "z"] and job.task.top_k == 2
    assert job.cluster.address == "tcp://10.0.0.1:8786"
    with pytest.raises(JobSpecError, match="expected key.path=value"):
        _load(tmp_path, GOOD, ["task.top_k"])


def test_fingerprint_tracks_outputs_not_scheduling(tmp_path):
    resolved = Settings(max_length=256, normalize=True)

    def fingerprint(overrides: list[str], revision: str = "rev",
                    settings: Settings = resolved) -> str:
        return job_fingerprint(_load(tmp_path, GOOD, overrides), revision, settings)

    base = fingerprint([])
    assert fingerprint(["cluster.n_workers=4"]) == base
    assert fingerprint(["engine.max_tokens_per_batch=999"]) == base
    # the resolved values count, not whether the job or the model directory gave them
    assert fingerprint(["model.max_length=256", "task.normalize=true"]) == base
    assert fingerprint([], settings=Settings(max_length=64)) != base
    assert fingerprint([], settings=Settings(max_length=256, normalize=True,
                                             prompt="query: ")) != base
    assert fingerprint([], "other-revision") != base


def test_settings_default_to_the_model(tmp_path):
    job = _load(tmp_path, GOOD)
    assert job.model.max_length is None
    assert (job.task.pooling, job.task.normalize, job.task.prompt, job.task.prompt_name) == \
        (None, None, None, None)
    with pytest.raises(JobSpecError, match="'mean', 'cls', 'max' or 'lasttoken'"):
        _load(tmp_path, GOOD, ["task.pooling=weightedmean"])


def test_sampling_follows_openai_and_vllm(tmp_path):
    """Issue 28, bug 4: a sampling field with do_sample unset samples; temperature 0 is
    greedy; nothing set leaves it to the model's generation_config.json."""
    gen = ["task.kind=generate"]
    assert _load(tmp_path, GOOD, [*gen, "task.temperature=0.7"]).task.samples is True
    assert _load(tmp_path, GOOD, [*gen, "task.top_p=0.9"]).task.samples is True
    assert _load(tmp_path, GOOD, [*gen, "task.top_k=5"]).task.samples is True
    assert _load(tmp_path, GOOD, [*gen, "task.temperature=0"]).task.samples is False
    assert _load(tmp_path, GOOD, [*gen, "task.do_sample=false"]).task.samples is False
    assert _load(tmp_path, GOOD, gen).task.samples is None


def test_new_task_fields_keep_existing_fingerprints(tmp_path):
    """A job that leaves the zero-shot fields unset keeps the fingerprint it had before they
    existed (figure computed with main's spec.py at ea65fac), so outputs do not recompute."""
    job = _load(tmp_path, GOOD, ["task.kind=classify", "task.labels=[a, b]", "task.top_k=2"])
    resolved = Settings(max_length=256, normalize=True)
    assert job_fingerprint(job, "rev", resolved) == "fd8cf42bc38076ac"
    templated = _load(tmp_path, GOOD, ["task.kind=classify", "task.labels=[a, b]",
                                       "task.label_template=About {}."])
    assert job_fingerprint(templated, "rev", resolved) != "fd8cf42bc38076ac"
