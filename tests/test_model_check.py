"""Model names and tasks checked before anything starts (spmd_dp/models/check.py, issue 25): exit 2 in seconds with
one line, never an engine start or the Hub's retries."""

import http.server
import json
import threading

import pytest

from spmd_dp.errors import UsageError
from spmd_dp.models.check import check_tasks, model_config
from spmd_dp.testing import echo_args, spmd
from tests.helpers import one_line


def vllm_run(tmp_path, records_file, *extra, **kw):
    """A vLLM run (not echo) that must stop at the check: exit 2, no engine started."""
    args = [a for a in echo_args(tmp_path, records_file, *extra) if a != "inference_engine=echo"]
    p = spmd(args, timeout=120, **kw)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "starting vLLM" not in p.stderr and "Starting" not in p.stderr  # before the ranks even meet
    return one_line(p)


def test_a_misspelt_embedded_model_names_the_nearest(tmp_path, records_file):
    line = vllm_run(tmp_path, records_file, "model_name=spmd-dp/tiny-lama")
    assert line.startswith("spmd_dp: config error: model_name='spmd-dp/tiny-lama' is not an embedded model; did you "
                           "mean spmd-dp/tiny-llama? the embedded ones: spmd-dp/tiny-llama, spmd-dp/small-llama"), line


@pytest.mark.slow
def test_a_missing_local_folder_names_the_directory_looked_in(tmp_path, records_file):
    line = vllm_run(tmp_path, records_file, "model_name=./models/my-llama", cwd=tmp_path)
    assert f"model_name='{tmp_path}/models/my-llama' does not exist (a relative path is read from the working " \
           f"directory {tmp_path})" in line, line
    line = vllm_run(tmp_path, records_file, "+engine_options.lora_adapters.pirate=./adapters/pirate", cwd=tmp_path)
    assert f"engine_options.lora_adapters.pirate='{tmp_path}/adapters/pirate' does not exist" in line, line
    line = vllm_run(tmp_path, records_file, "+engine_options.lora_adapters.a=spmd-dp/tiny-llama-lora-z")
    assert "is not an embedded adapter; did you mean spmd-dp/tiny-llama-lora-" in line, line


@pytest.mark.slow
def test_a_hub_id_offline_is_looked_up_in_the_local_cache_at_once(tmp_path, records_file):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}
    line = vllm_run(tmp_path, records_file, "model_name=some-org/some-model", env=env)
    assert f"model_name='some-org/some-model' is not in the local Hugging Face cache ({tmp_path / 'hf'}) and " \
           "HF_HUB_OFFLINE=1 allows no download; download it first (huggingface-cli download some-org/some-model)" \
           in line, line
    # the Hub unreachable (a closed port here): one try, no retries
    line = vllm_run(tmp_path, records_file, "model_name=some-org/some-model",
                    env={"HF_HUB_CACHE": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert "is not in the local Hugging Face cache" in line and "the Hub cannot be reached" in line, line


def cached(monkeypatch, tmp_path, repo, config):
    """`repo` in a Hugging Face cache under tmp_path (the layout huggingface_hub writes), with its config.json."""
    from huggingface_hub import constants

    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("abc123")
    (root / "snapshots" / "abc123").mkdir(parents=True)
    (root / "snapshots" / "abc123" / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_a_cached_hub_model_is_read_from_the_cache(monkeypatch, tmp_path):
    config = {"architectures": ["XLMRobertaForSequenceClassification"], "id2label": {"0": "LABEL_0"}}
    cached(monkeypatch, tmp_path, "org/reranker", config)
    assert model_config("org/reranker", "model_name") == config
    check_tasks("org/reranker", config, ["score"])  # a 1-label classifier: a cross-encoder


class Hub(http.server.BaseHTTPRequestHandler):
    """The Hub's answers (to a client without a token) for a repository that does not exist, or is gated."""

    def do_GET(self):
        gated = "gated" in self.path
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo" if gated else "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "no"}')

    def log_message(self, *args):
        pass


def test_the_hub_says_unknown_or_gated(monkeypatch, tmp_path):
    from huggingface_hub import constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        with pytest.raises(UsageError, match=r"model_name='org/typo' is not a model on the Hugging Face Hub, nor a "
                                             r"folder \(relative to the working directory"):
            model_config("org/typo", "model_name")
        with pytest.raises(UsageError, match=r"'org/gated' is a gated model: accept its terms .* set HF_TOKEN"):
            model_config("org/gated", "model_name")
    finally:
        server.shutdown()


LM = {"architectures": ["LlamaForCausalLM"]}
CLASSIFIER = {"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "a", "1": "b", "2": "c"}}
CROSS_ENCODER = {"architectures": ["BertForSequenceClassification"], "num_labels": 1}
LM_RERANKER = {"architectures": ["Qwen3ForCausalLM"], "classifier_from_token": ["no", "yes"],
               "method": "from_2_way_softmax"}


@pytest.mark.parametrize("config,tasks,error", [
    (LM, ["generate", "embed", "score"], None),  # score: the cosine of the two embeddings
    (LM, ["classify"], "is a causal LM (LlamaForCausalLM) with no classification head"),
    (LM, ["reward"], "task=reward"),
    (CLASSIFIER, ["classify", "reward"], None),
    (CLASSIFIER, ["generate"], "is a sequence classifier (LlamaForSequenceClassification): it cannot generate"),
    (CLASSIFIER, ["score"], "a sequence classifier with 3 labels; scoring a pair with a classifier (a "
                            "cross-encoder) needs one label: use a 1-label model (spmd-dp/tiny-llama-reward"),
    (CROSS_ENCODER, ["score", "classify"], None),
    (LM_RERANKER, ["score"], None),
    ({}, ["score"], None),  # no architectures: left to vLLM
])
def test_tasks_against_the_models_config(config, tasks, error):
    if error is None:
        check_tasks("m", config, tasks)
    else:
        with pytest.raises(UsageError, match=error.replace("(", r"\(").replace(")", r"\)")):
            check_tasks("m", config, tasks)


def test_score_with_the_embedded_classifier_is_exit_2_with_the_fix(tmp_path, records_file):
    line = vllm_run(tmp_path, records_file, "model_name=spmd-dp/tiny-llama-classifier", "task=score")
    assert "task=score: model_name='spmd-dp/tiny-llama-classifier' is a sequence classifier with 3 labels" in line
    assert "use a 1-label model (spmd-dp/tiny-llama-reward" in line and "or task=classify" in line


def test_hf_overrides_are_the_config_vllm_sees(tmp_path, records_file):
    """A causal LM made a reranker through vLLM's hf_overrides is not refused for score or classify."""
    from spmd_dp.config import load_config
    from spmd_dp.models.check import check_model

    overrides = '+engine_options.vllm_kwargs.hf_overrides={classifier_from_token: [no, yes], method: from_2_way_softmax}'
    check_model(load_config(["task=classify", overrides]))
    with pytest.raises(UsageError, match="no classification head"):
        check_model(load_config(["task=classify"]))
