"""LoRA over HTTP, as vLLM serves it: adapters from --lora-modules (both forms) chosen by ``model`` on every
endpoint, listed by /v1/models with parent and root, loaded and unloaded at run time (behind the API key,
while other requests run), bad adapters refused with 400/404 while the server goes on, and
vllm:lora_requests_info on /metrics."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from llmserve import LLM, SamplingParams
from llmserve.entrypoints.openai import api_server
from llmserve.lora.request import LoRARequest
from llmserve.testing.lora_adapters import FUSED_MODULES, write_lora_adapter
from tests.entrypoints.openai.conftest import launch
from tests.entrypoints.openai.test_metrics import scrape, wait_for
from tests.entrypoints.openai.test_openapi import document, error_statuses, operations

KEY = "lora-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def adapters(lora_adapter):
    return {"a": lora_adapter("all-r8"), "b": lora_adapter("patterns"), "c": lora_adapter("qv-rslora-r4")}


@pytest.fixture(scope="module")
def server(llama_dir, adapters, tmp_path_factory):
    b = json.dumps({"name": "b", "path": str(adapters["b"]), "base_model_name": "tiny"})
    srv = launch(llama_dir, "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--api-key", KEY,
                 "--lora-modules", f"a={adapters['a']}", b, "--allow-runtime-lora-updating",
                 log_dir=tmp_path_factory.mktemp("lora-server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def offline(llama_dir):
    return LLM(str(llama_dir), enable_lora=True, max_loras=2, max_lora_rank=8, kv_cache_memory_bytes="16MiB")


def complete(server, model: str, **extra) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/completions", headers=AUTH, timeout=60,
                      json={"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra})


def offline_text(offline: LLM, lora: LoRARequest | None) -> str:
    params = SamplingParams(temperature=0, max_tokens=8)
    return offline.generate(PROMPT, params, lora_request=lora)[0].outputs[0].text


def test_models_lists_adapters_with_parent_and_root(server, adapters):
    cards = {c["id"]: c for c in httpx.get(f"{server.base_url}/v1/models", headers=AUTH).json()["data"]}
    assert cards["tiny"]["parent"] is None
    assert (cards["a"]["parent"], cards["a"]["root"]) == ("tiny", str(adapters["a"]))
    assert (cards["b"]["parent"], cards["b"]["root"]) == ("tiny", str(adapters["b"]))


def test_model_name_chooses_the_adapter_on_every_endpoint(server, adapters, offline):
    for model, lora in (("tiny", None), ("a", LoRARequest("a", 1, str(adapters["a"]))),
                        ("b", LoRARequest("b", 2, str(adapters["b"])))):
        response = complete(server, model)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model
        assert response.json()["choices"][0]["text"] == offline_text(offline, lora)
    chat = httpx.post(f"{server.base_url}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["model"] == "b"
    responses = httpx.post(f"{server.base_url}/v1/responses", headers=AUTH, timeout=60,
                           json={"model": "a", "input": "hi", "max_output_tokens": 4})
    assert responses.status_code == 200 and responses.json()["model"] == "a"
    vectors = {}
    for model in ("tiny", "a"):
        embedded = httpx.post(f"{server.base_url}/v1/embeddings", headers=AUTH, timeout=60,
                              json={"model": model, "input": PROMPT})
        assert embedded.status_code == 200 and embedded.json()["model"] == model
        vectors[model] = embedded.json()["data"][0]["embedding"]
    assert vectors["tiny"] != vectors["a"]
    missing = complete(server, "nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_runtime_load_and_unload_while_requests_run(server, adapters, offline):
    url = server.base_url
    assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": str(adapters["c"])}
                      ).status_code == 401

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
            body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
            running = [asyncio.ensure_future(client.post("/v1/completions", json={"model": m, **body}))
                       for m in ("a", "b", "tiny", "a", "b", "tiny")]
            admin = [await client.post("/v1/load_lora_adapter",
                                       json={"lora_name": "c", "lora_path": str(adapters["c"])})]
            admin.append(await client.post("/v1/completions", json={"model": "c", **body, "max_tokens": 8}))
            admin.append(await client.post("/v1/unload_lora_adapter", json={"lora_name": "c"}))
            return list(await asyncio.gather(*running)), admin

    running, (loaded, used, unloaded) = asyncio.run(scenario())
    assert all(r.status_code == 200 for r in running), [r.text for r in running]
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'c' added successfully."
    assert used.status_code == 200
    assert used.json()["choices"][0]["text"] == offline_text(offline, LoRARequest("c", 3, str(adapters["c"])))
    assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'c' removed successfully."
    assert complete(server, "c").status_code == 404
    # loaded again: a new id, the same weights
    assert httpx.post(f"{url}/v1/load_lora_adapter", headers=AUTH,
                      json={"lora_name": "c", "lora_path": str(adapters["c"])}).status_code == 200
    assert complete(server, "c").json()["choices"][0]["text"] == used.json()["choices"][0]["text"]


def test_bad_adapters_are_refused_and_the_server_goes_on(server, adapters, llama_dir, checkpoint_dir, lora_adapter,
                                                         tmp_path):
    def load(name, path, **extra):
        return httpx.post(f"{server.base_url}/v1/load_lora_adapter", headers=AUTH,
                          json={"lora_name": name, "lora_path": str(path), **extra})

    dora = write_lora_adapter(tmp_path / "dora", llama_dir, extra_config={"use_dora": True})
    big = write_lora_adapter(tmp_path / "big", llama_dir, r=16)
    other_shapes = write_lora_adapter(tmp_path / "gemma2", checkpoint_dir("gemma2"), target_modules=["q_proj"])
    fused = lora_adapter("fused", "phi3", target_modules=FUSED_MODULES)   # qkv_proj: not a module of Llama's
    cases = [(load("x", tmp_path / "missing"), 404, "No adapter found"),
             (load("x", dora), 400, "DoRA"),
             (load("x", big), 400, "greater than --max-lora-rank 8"),
             (load("x", other_shapes), 400, "does not fit the base model: model.layers.0.self_attn.q_proj has lora_A"),
             (load("x", fused), 400, "gate_up_proj, which is not a module of the base model (nor are 3 more"),
             (load("a", adapters["c"]), 400, "has already been loaded"),
             (httpx.post(f"{server.base_url}/v1/load_lora_adapter", headers=AUTH, json={"lora_name": "x"}), 400,
              "Both 'lora_name' and 'lora_path' must be provided"),
             (httpx.post(f"{server.base_url}/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "x"}), 404,
              "cannot be found"),
             (httpx.post(f"{server.base_url}/v1/unload_lora_adapter", headers=AUTH,
                         json={"lora_name": "a", "lora_int_id": 99}), 404, "cannot be found")]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert message in response.json()["error"]["message"]
    assert complete(server, "a").status_code == 200


def test_lora_requests_info_metric(server):
    complete(server, "a")
    current = wait_for(server.base_url, lambda s: "vllm:lora_requests_info" in s.samples)
    labels = [labels for labels, _ in current.samples["vllm:lora_requests_info"]]
    assert len(labels) == 1 and labels[0]["max_lora"] == "2"
    assert set(labels[0]) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert scrape(server.base_url).types["vllm:lora_requests_info"] == "gauge"


@pytest.mark.parametrize("args,message", [
    (["--lora-modules", "a=/x"], "need --enable-lora"),
    (["--enable-lora", "--lora-modules", "no-path"], "must be name=path or a JSON object"),
    (["--enable-lora", "--lora-modules", '{"name": "a"}'], "string 'name' and 'path'"),
])
def test_bad_lora_flags_stop_the_server_at_start(llama_dir, args, message, capsys):
    assert api_server.main(["--model", str(llama_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_runtime_routes_exist_only_when_allowed():
    assert not {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"} & set(operations(document()))
    ops = operations(document(allow_runtime_lora_updating=True))
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert {"400", "404", "503"} <= error_statuses(ops[path])
