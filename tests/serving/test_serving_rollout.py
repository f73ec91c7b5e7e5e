"""Rollout modes: serving/rollout.py on its own, the settings, in-process edge cases, then real HTTP.

Champion and challenger are tiny model directories built with different seeds, so
they disagree on part of the inputs; every served answer is checked against the
ONNX Runtime output of the model whose version it claims. One `bentoml serve` per
mode (shadow, canary), each for its own class of tests, with two workers, so
stickiness and the counters are checked across processes.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from serving import ServingConfig, ServingError
from serving.launch import check_rollout, serve_env
from serving.reload import publish, watch_pending_root
from serving.rollout import (
    CANARY,
    CHAMPION,
    SHADOW,
    RolloutPolicy,
    ShadowBook,
    agreements,
    contract_mismatch,
    key_fraction,
)
from tests.serving_fixtures import (
    RunningServer,
    build_model_dir,
    digit_png,
    metric_value,
    onnx_probabilities,
    sample_instances,
    scrape,
)
from tests.waiting import exceptions_of, raise_if_any_failed, wait_for

MODEL = "fluxo"


def four_sigma(n: int, p: float) -> float:
    return 4 * math.sqrt(n * p * (1 - p))


# --- serving/rollout.py -------------------------------------------------------------------


def test_key_fraction_is_stable_and_spread_evenly() -> None:
    """Pinned values: a key must land on the same variant in every worker, process and release."""
    assert key_fraction("user-42") == key_fraction("user-42") == pytest.approx(0.4360472144288925, abs=1e-15)
    points = [key_fraction(f"key-{i}") for i in range(20_000)]
    assert all(0.0 <= p < 1.0 for p in points)
    assert abs(np.mean(points) - 0.5) < 0.01
    assert abs(np.mean(np.array(points) < 0.1) - 0.1) < 0.01


def test_canary_is_sticky_by_key_and_keeps_its_share() -> None:
    policy = RolloutPolicy(CANARY, canary_share=0.25, draw=lambda: 0.99)  # key-less would always be champion
    keys = [f"client-{i}" for i in range(4000)]
    first = [policy.challenger_answers(k) for k in keys]
    assert all(policy.challenger_answers(k) == f for k, f in zip(keys, first) for _ in range(3))
    assert abs(sum(first) - 1000) <= four_sigma(4000, 0.25)
    assert [policy.challenger_answers(k) for k in keys[:50]] == [key_fraction(k) < 0.25 for k in keys[:50]]


def test_keyless_canary_requests_draw_at_random() -> None:
    rng = random.Random(7)
    policy = RolloutPolicy(CANARY, canary_share=0.25, draw=rng.random)
    picks = sum(policy.challenger_answers(None) for _ in range(4000))
    assert abs(picks - 1000) <= four_sigma(4000, 0.25)
    assert not RolloutPolicy(CANARY, canary_share=0.0).challenger_answers("any")
    assert RolloutPolicy(CANARY, canary_share=1.0).challenger_answers(None)


def test_shadow_sampling_and_modes_that_do_neither() -> None:
    rng = random.Random(3)
    sampled = RolloutPolicy(SHADOW, shadow_sample=0.3, draw=rng.random)
    assert abs(sum(sampled.mirrors() for _ in range(4000)) - 1200) <= four_sigma(4000, 0.3)
    assert all(RolloutPolicy(SHADOW).mirrors() for _ in range(100))  # default 1.0: every request
    assert not any(RolloutPolicy(SHADOW, shadow_sample=0.0).mirrors() for _ in range(100))
    for mode in (CHAMPION, CANARY):
        assert not RolloutPolicy(mode).mirrors()
    assert not RolloutPolicy(SHADOW, canary_share=1.0).challenger_answers("k")
    assert not RolloutPolicy(CHAMPION, canary_share=1.0).challenger_answers("k")


@pytest.mark.parametrize("kwargs", [{"mode": "blue"}, {"canary_share": 1.5}, {"shadow_sample": -0.1},
                                    {"canary_share": float("nan")}])
def test_policy_refuses_impossible_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RolloutPolicy(**kwargs)


def test_agreements_and_the_contract_check() -> None:
    champion = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    challenger = np.array([[0.7, 0.3], [0.9, 0.1], [0.51, 0.49]])
    assert agreements(champion, challenger) == 2
    with pytest.raises(ValueError):
        agreements(champion, challenger[:2])
    info = {"input_shape": [1, 8, 8], "input_dtype": "float32", "labels": ["a", "b"], "image": None}
    assert contract_mismatch(info, dict(info)) is None
    assert "labels" in contract_mismatch(info, {**info, "labels": ["b", "a"]})
    assert "input_shape" in contract_mismatch(info, {**info, "input_shape": [64]})


def test_shadow_mirrors_whole_batches_or_a_sampled_mask() -> None:
    assert RolloutPolicy(SHADOW).mirrored_rows([1, 3, 2]) == (3, None)  # everything, no indexing
    assert RolloutPolicy(SHADOW, shadow_sample=0.0).mirrored_rows([1, 3]) == (0, None)
    assert RolloutPolicy(CANARY).mirrored_rows([1, 3]) == (0, None)
    draws = iter([0.1, 0.9, 0.2])  # request 0 and 2 in, request 1 out
    taken, mask = RolloutPolicy(SHADOW, shadow_sample=0.5, draw=lambda: next(draws)).mirrored_rows([1, 3, 2])
    assert taken == 2 and mask.tolist() == [True, False, False, False, True, True]


def test_shadow_book_caps_mirrors_in_flight() -> None:
    book = ShadowBook(limit=4)
    assert book.admit(3) and book.admit(2)  # under the cap when asked: over it by one batch at most
    assert not book.admit(1) and book.skipped == 1 and book.in_flight == 5
    book.release(3)
    assert book.admit(1) and book.in_flight == 3


# --- settings and launcher ---------------------------------------------------------------------


def test_rollout_settings_from_env() -> None:
    assert ServingConfig.from_env({}).rollout == "champion"
    default = ServingConfig.from_env({})
    assert (default.canary_share, default.shadow_sample, default.challenger_dir) == (0.1, 1.0, None)
    config = ServingConfig.from_env({"FLUXO_ROLLOUT": "Canary", "FLUXO_CANARY_SHARE": "0.25",
                                     "FLUXO_SHADOW_SAMPLE": "0", "FLUXO_CHALLENGER_DIR": "/models/challenger"})
    assert (config.rollout, config.canary_share, config.shadow_sample) == ("canary", 0.25, 0.0)
    assert config.challenger_dir == Path("/models/challenger")


@pytest.mark.parametrize(
    ("name", "value"),
    [("FLUXO_ROLLOUT", "blue-green"), ("FLUXO_CANARY_SHARE", "1.5"), ("FLUXO_CANARY_SHARE", "-0.1"),
     ("FLUXO_CANARY_SHARE", "ten percent"), ("FLUXO_CANARY_SHARE", "nan"), ("FLUXO_SHADOW_SAMPLE", "2"),
     ("FLUXO_SHADOW_SAMPLE", "half")],
)
def test_bad_rollout_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ServingError, match=rf"environment variable {name}="):
        ServingConfig.from_env({name: value})


def test_serve_env_sets_the_rollout(tmp_path: Path) -> None:
    champion = build_model_dir(tmp_path / "a")
    config = ServingConfig.for_model_dir(champion, challenger_dir=tmp_path / "root", rollout="canary",
                                         canary_share=0.25, shadow_sample=0.5)
    env = serve_env(config)
    assert env["FLUXO_ROLLOUT"] == "canary" and env["FLUXO_CANARY_SHARE"] == "0.25"
    assert env["FLUXO_SHADOW_SAMPLE"] == "0.5"
    assert env["FLUXO_CHALLENGER_DIR"] == str((tmp_path / "root").resolve())
    assert ServingConfig.from_env(env) == replace(config, model_dir=champion.resolve(),
                                                  challenger_dir=(tmp_path / "root").resolve())
    assert serve_env(ServingConfig.for_model_dir(champion))["FLUXO_ROLLOUT"] == "champion"
    plain = ServingConfig.for_model_dir(champion)
    assert serve_env(plain, {"FLUXO_ROLLOUT": "shadow"})["FLUXO_ROLLOUT"] == "shadow"  # env= wins
    with pytest.raises(ServingError, match="FLUXO_ROLLOUT='blue'"):
        serve_env(replace(plain, rollout="blue"))
    with pytest.raises(ServingError, match="FLUXO_CANARY_SHARE=2.0"):
        serve_env(replace(plain, rollout="canary", canary_share=2))
    with pytest.raises(ServingError, match="FLUXO_SHADOW_SAMPLE=-1.0"):
        serve_env(replace(plain, rollout="shadow", shadow_sample=-1))
    with pytest.raises(ServingError, match="rollout is 'champion'"):
        serve_env(replace(plain, challenger_dir=tmp_path / "b"))


def test_the_launcher_refuses_a_challenger_that_reads_other_inputs(tmp_path: Path) -> None:
    champion = build_model_dir(tmp_path / "a")
    other = build_model_dir(tmp_path / "b", labels=["x", "y"])
    meta = {"input_shape": [1, 8, 8], "input_dtype": "float32", "labels": [str(i) for i in range(10)],
            "dataset": "digits"}
    with pytest.raises(ServingError, match="cannot stand in for the champion: its labels"):
        check_rollout(serve_env(ServingConfig.for_model_dir(champion, challenger_dir=other, rollout="shadow")), meta)
    check_rollout(serve_env(ServingConfig.for_model_dir(champion, challenger_dir=tmp_path / "later",
                                                       rollout="shadow")), meta)  # waits for it
    with pytest.raises(ServingError, match="FLUXO_SHADOW_SAMPLE"):
        serve_env(ServingConfig.for_model_dir(champion, rollout="shadow"), {"FLUXO_SHADOW_SAMPLE": "3"})


def test_a_pending_root_is_noticed_when_its_pointer_appears(tmp_path: Path) -> None:
    model = build_model_dir(tmp_path / "b")
    watcher = watch_pending_root(tmp_path / "root-not-created-yet")
    assert watcher.poll() is None
    publish(tmp_path / "root-not-created-yet", model)
    assert watcher.poll() == model.resolve()
    watcher.accept(model)
    assert watcher.poll() is None


# --- in process: the app without bentoml ---------------------------------------------------------


def _in_process(config: ServingConfig) -> tuple[object, object]:
    from serving.app import create_app
    from serving.server import ModelServer

    app = create_app()
    app.state.server = ModelServer(config)
    return app, app.state.server


async def _post(app: object, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fluxo") as client:
        return await client.post(path, json=body, headers=headers or {})


def test_champion_mode_carries_no_rollout(tmp_path: Path) -> None:
    champion = build_model_dir(tmp_path / "a", seed=0, model_version="1")
    challenger = build_model_dir(tmp_path / "b", seed=1, model_version="2")
    app, server = _in_process(ServingConfig(model_dir=champion, provider="cpu", challenger_dir=challenger))
    assert server.rollout is None and server.challenger is None

    async def run() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fluxo") as client:
            answer = await client.post("/predict", json={"instances": sample_instances(1).tolist()})
            return answer, await client.get("/metadata")

    answer, metadata = asyncio.run(run())
    assert answer.status_code == 200 and "x-fluxo-variant" not in answer.headers
    assert metadata.json()["rollout"] == {"mode": "champion", "canary_share": 0.1, "shadow_sample": 1.0,
                                          "challenger": None, "challenger_error": None}


def test_a_failing_challenger_is_counted_and_never_reaches_the_client(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    champion = build_model_dir(tmp_path / "a", seed=0, model_version="1")
    challenger = build_model_dir(tmp_path / "b", seed=1, model_version="2")
    app, server = _in_process(ServingConfig(model_dir=champion, provider="cpu", rollout="shadow",
                                            challenger_dir=challenger))

    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("challenger graph exploded")

    server.challenger.batcher._run = broken

    def errors() -> float:
        return REGISTRY.get_sample_value("fluxo_shadow_comparisons_total", {"outcome": "error"}) or 0.0

    before = errors()
    batch = sample_instances(3, seed=4)

    async def run() -> httpx.Response:
        answer = await _post(app, "/predict", {"instances": batch.tolist()})
        deadline = asyncio.get_running_loop().time() + 30  # the mirror runs after the answer: wait for it
        while server._shadow_tasks:
            assert asyncio.get_running_loop().time() < deadline, "the mirrored run never ended"
            await asyncio.sleep(0.01)
        return answer

    answer = asyncio.run(run())
    assert answer.status_code == 200 and answer.headers["x-fluxo-variant"] == "champion"
    served = np.array([p["probabilities"] for p in answer.json()["predictions"]])
    np.testing.assert_allclose(served, onnx_probabilities(champion, batch), atol=1e-6)
    assert errors() - before == 3  # one per mirrored instance
    assert server.shadow_book.in_flight == 0


def test_a_slow_challenger_delays_no_answer_and_its_backlog_is_capped(tmp_path: Path) -> None:
    """Mirrors run after the answer and beside it; beyond the cap they are skipped; drain waits for the rest."""
    champion = build_model_dir(tmp_path / "a", seed=0, model_version="1")
    challenger = build_model_dir(tmp_path / "b", seed=1, model_version="2")
    app, server = _in_process(ServingConfig(model_dir=champion, provider="cpu", rollout="shadow",
                                            challenger_dir=challenger, max_concurrency=1))
    real = server.challenger.batcher._run
    release = threading.Event()  # set once every answer is in: a mirror that held up an answer never sees it
    held_up: list[bool] = []

    def slow(batch: np.ndarray) -> np.ndarray:
        held_up.append(not release.wait(30))
        return real(batch)

    server.challenger.batcher._run = slow
    batch = sample_instances(1, seed=2)

    async def run() -> tuple[list[httpx.Response], int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fluxo") as client:
            answers = [await client.post("/predict", json={"instances": batch.tolist()})]  # its mirror: held
            for _ in range(5):  # one at a time: FLUXO_MAX_CONCURRENCY=1 also admits one request at a time
                answers.append(await client.post("/predict", json={"instances": batch.tolist()}))
        in_flight = server.shadow_book.in_flight
        release.set()
        await server.drain(timeout=30)
        return answers, in_flight

    answers, in_flight = asyncio.run(run())
    assert all(a.status_code == 200 and a.headers["x-fluxo-variant"] == "champion" for a in answers)
    # The first mirror was still held when all six answers were in: no answer waited for the challenger.
    assert held_up == [False], "an answer waited for the challenger's mirror"
    assert in_flight == 1 and server.shadow_book.skipped == 5  # the cap is FLUXO_MAX_CONCURRENCY
    assert server.shadow_book.in_flight == 0 and not server._shadow_tasks  # drained


def test_a_challenger_with_other_labels_is_not_served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    champion = build_model_dir(tmp_path / "a")
    other = build_model_dir(tmp_path / "b", labels=[f"c{i}" for i in range(10)])
    with caplog.at_level("ERROR", logger="serving.server"):
        _, server = _in_process(ServingConfig(model_dir=champion, provider="cpu", rollout="canary",
                                              challenger_dir=other))
    assert server.challenger is None and "cannot stand in for the champion: its labels" in caplog.text


# --- over HTTP ------------------------------------------------------------------------------------


@dataclass
class Models:
    champion: Path
    challenger: Path
    third: Path
    root: Path  # the challenger's model root

    def reference(self, version: str, batch: np.ndarray) -> np.ndarray:
        path = {"1": self.champion, "2": self.challenger, "3": self.third}[version]
        return onnx_probabilities(path, batch)


def _models(tmp: Path) -> Models:
    return Models(
        champion=build_model_dir(tmp / "champion-v1", seed=0, model_version="1"),
        challenger=build_model_dir(tmp / "challenger-v2", seed=1, model_version="2"),
        third=build_model_dir(tmp / "challenger-v3", seed=2, model_version="3"),
        root=tmp / "challenger-root",
    )


def _env(**extra: str) -> dict[str, str]:
    return {"FLUXO_RELOAD_INTERVAL_S": "0.2", "FLUXO_MAX_BATCH_SIZE": "8", "FLUXO_TIMEOUT_S": "60", **extra}


def v2_body(batch: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "shape": list(batch.shape), "datatype": "FP32",
                        "data": batch.ravel().tolist()}]}


def ask(client: httpx.Client, url: str, x: np.ndarray, route: int, headers: dict | None = None) -> httpx.Response:
    """One single-instance request on route 0 (/predict), 1 (v2 infer) or 2 (/predict/image)."""
    if route == 0:
        return client.post(f"{url}/predict", json={"instances": [x.tolist()]}, headers=headers)
    if route == 1:
        return client.post(f"{url}/v2/models/{MODEL}/infer", json=v2_body(x[None]), headers=headers)
    return client.post(f"{url}/predict/image", files={"file": ("x.png", digit_png(x), "image/png")}, headers=headers)


def answer_of(response: httpx.Response) -> tuple[str, str, np.ndarray]:
    """(variant header, model_version, probabilities) of a 200 answer from any route."""
    assert response.status_code == 200, response.text
    body = response.json()
    if "outputs" in body:
        assert body["model_name"] == MODEL  # the champion's name, whichever variant answered
        out = {o["name"]: o for o in body["outputs"]}["probabilities"]
        probabilities = np.array(out["data"]).reshape(out["shape"])
    else:
        probabilities = np.array([p["probabilities"] for p in body["predictions"]])
    return response.headers["x-fluxo-variant"], body["model_version"], probabilities


def metrics(url: str) -> str:
    return scrape(url)


def wait_for_challenger(url: str, version: str | None, timeout: float = 30.0) -> None:
    """Until every worker reports ``version`` as its challenger (ten /metadata answers in a row)."""
    seen: set[str | None] = set()

    def every_worker_has_it() -> bool:
        seen.clear()
        for _ in range(10):
            challenger = httpx.get(f"{url}/metadata", timeout=10).json()["rollout"]["challenger"]
            seen.add(challenger["model_version"] if challenger else None)
        return seen == {version}

    wait_for(every_worker_has_it, f"challenger version {version} on every worker", timeout=timeout,
             detail=lambda: f"challenger versions {seen}")


class TestShadow:
    """Shadow mode, started before the challenger's root has a pointer."""

    N = 120

    @pytest.fixture(scope="class")
    def shadow(self, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Models]]:
        tmp = tmp_path_factory.mktemp("shadow")
        models = _models(tmp)
        env = _env(FLUXO_ROLLOUT="shadow", FLUXO_CHALLENGER_DIR=str(models.root))
        with RunningServer(models.champion, env, tmp / "server.log") as running:
            yield running, models

    def test_without_a_challenger_the_champion_serves_alone(self, shadow: tuple[RunningServer, Models]) -> None:
        running, models = shadow
        x = sample_instances(1, seed=9)
        with httpx.Client(timeout=30) as client:
            variant, version, probabilities = answer_of(ask(client, running.url, x[0], 0))
        assert (variant, version) == ("champion", "1")
        np.testing.assert_allclose(probabilities, models.reference("1", x), atol=1e-6)
        rollout = httpx.get(f"{running.url}/metadata", timeout=10).json()["rollout"]
        assert rollout == {"mode": "shadow", "canary_share": 0.1, "shadow_sample": 1.0, "challenger": None,
                           "challenger_error": None}
        assert "has no current.json yet: serving the champion alone" in running.log()
        assert metric_value(metrics(running.url), "fluxo_shadow_comparisons_total") == 0

    def test_clients_get_champion_answers_and_the_challenger_is_compared(
        self, shadow: tuple[RunningServer, Models]
    ) -> None:
        running, models = shadow
        publish(models.root, models.challenger)  # the pointer appears after the server started
        wait_for_challenger(running.url, "2")
        before = metrics(running.url)
        pool = sample_instances(self.N, seed=21)

        def client(worker: int) -> list[tuple[int, httpx.Response]]:
            with httpx.Client(timeout=30) as http:
                return [(i, ask(http, running.url, pool[i], i % 3)) for i in range(worker, self.N, 6)]

        with ThreadPoolExecutor(6) as executor:
            responses = [r for batch in executor.map(client, range(6)) for r in batch]
        champion, challenger = models.reference("1", pool), models.reference("2", pool)
        for i, response in responses:
            variant, version, probabilities = answer_of(response)
            assert (variant, version) == ("champion", "1")
            np.testing.assert_allclose(probabilities[0], champion[i], atol=1e-5)
        expected_agree = agreements(champion, challenger)
        assert 0 < expected_agree < self.N, "the two fixtures must disagree on some inputs"

        def delta(name: str, **labels: str) -> float:
            return metric_value(metrics(running.url), name, **labels) - metric_value(before, name, **labels)

        wait_for(lambda: delta("fluxo_shadow_comparisons_total") >= self.N, "every shadow comparison", timeout=60)
        assert delta("fluxo_shadow_comparisons_total") == self.N
        assert delta("fluxo_shadow_comparisons_total", outcome="agree") == expected_agree
        assert delta("fluxo_shadow_comparisons_total", outcome="disagree") == self.N - expected_agree
        assert delta("fluxo_variant_requests_total", variant="challenger") == self.N
        assert delta("fluxo_variant_requests_total", variant="champion") == self.N
        assert delta("fluxo_variant_latency_seconds_count", variant="challenger") == self.N
        page = metrics(running.url)
        assert metric_value(page, "fluxo_challenger_info", model_version="2") == 1
        assert metric_value(page, "fluxo_shadow_skipped_total") == 0
        assert delta("fluxo_batch_requests_sum") == self.N  # fluxo_batch_* count the champion's batches only


class TestCanary:
    """Canary mode at a share of 0.25, challenger published before start, then republished under load."""

    SHARE = 0.25

    @pytest.fixture(scope="class")
    def canary(self, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Models]]:
        tmp = tmp_path_factory.mktemp("canary")
        models = _models(tmp)
        publish(models.root, models.challenger)
        env = _env(FLUXO_ROLLOUT="canary", FLUXO_CANARY_SHARE=str(self.SHARE), FLUXO_CHALLENGER_DIR=str(models.root))
        with RunningServer(models.champion, env, tmp / "server.log") as running:
            wait_for_challenger(running.url, "2")
            yield running, models

    def test_metadata_reports_the_rollout(self, canary: tuple[RunningServer, Models]) -> None:
        running, _ = canary
        body = httpx.get(f"{running.url}/metadata", timeout=10).json()
        assert body["model_version"] == "1"
        rollout = body["rollout"]
        assert (rollout["mode"], rollout["canary_share"], rollout["shadow_sample"]) == ("canary", self.SHARE, 1.0)
        assert rollout["challenger"]["model_version"] == "2" and rollout["challenger"]["input_shape"] == [1, 8, 8]

    def test_keyless_requests_reach_the_challenger_at_its_share(self, canary: tuple[RunningServer, Models]) -> None:
        running, models = canary
        n = 400
        pool = sample_instances(n, seed=5)
        with httpx.Client(timeout=30) as client:
            answers = [answer_of(ask(client, running.url, pool[i], 0)) for i in range(n)]
        by_version = {"champion": "1", "challenger": "2"}
        for i, (variant, version, probabilities) in enumerate(answers):
            assert version == by_version[variant]
            np.testing.assert_allclose(probabilities[0], models.reference(version, pool[i : i + 1])[0], atol=1e-6)
        to_challenger = sum(variant == "challenger" for variant, _, _ in answers)
        assert abs(to_challenger - n * self.SHARE) <= four_sigma(n, self.SHARE), to_challenger

    def test_a_request_key_always_gets_the_same_variant(self, canary: tuple[RunningServer, Models]) -> None:
        running, models = canary
        keys = [f"user-{i}" for i in range(40)]
        pool = sample_instances(5, seed=13)
        seen: dict[str, set[tuple[str, str]]] = {k: set() for k in keys}
        for key in keys:
            for j in range(5):
                with httpx.Client(timeout=30) as client:  # a new connection each time: any worker may answer
                    response = ask(client, running.url, pool[j], j % 3, headers={"X-Request-Key": key})
                variant, version, probabilities = answer_of(response)
                seen[key].add((variant, version))
                np.testing.assert_allclose(probabilities[0], models.reference(version, pool[j : j + 1])[0], atol=1e-5)
        for key in keys:
            expected = ("challenger", "2") if key_fraction(key) < self.SHARE else ("champion", "1")
            assert seen[key] == {expected}, key
        assert {v for s in seen.values() for v in s} == {("challenger", "2"), ("champion", "1")}

    def test_v2_can_pin_either_version(self, canary: tuple[RunningServer, Models]) -> None:
        running, models = canary
        x = sample_instances(2, seed=17)
        for version, variant in (("1", "champion"), ("2", "challenger")):
            response = httpx.post(f"{running.url}/v2/models/{MODEL}/versions/{version}/infer", json=v2_body(x),
                                  timeout=30)
            answered, served, probabilities = answer_of(response)
            assert (answered, served) == (variant, version)
            np.testing.assert_allclose(probabilities, models.reference(version, x), atol=1e-5)
        assert httpx.post(f"{running.url}/v2/models/{MODEL}/versions/9/infer", json=v2_body(x),
                          timeout=30).status_code == 404

    def test_the_challenger_reloads_on_its_own_without_failing_a_request(
        self, canary: tuple[RunningServer, Models]
    ) -> None:
        running, models = canary
        pool = sample_instances(16, seed=23)
        to_challenger = next(f"k{i}" for i in range(1000) if key_fraction(f"k{i}") < self.SHARE)
        stop = threading.Event()
        clients = 4
        sent = [0] * clients
        answers: list[tuple[int, int, httpx.Response]] = []  # (client, row, response)

        def client(index: int) -> None:
            headers = {"X-Request-Key": to_challenger} if index % 2 else {}  # odd clients: always the challenger
            with httpx.Client(timeout=30) as http:
                i = index
                while not stop.is_set():
                    sent[index] += 1
                    answers.append((index, i % 16, ask(http, running.url, pool[i % 16], i % 3, headers)))
                    i += 1

        def answered(index: int, variant: str, version: str) -> bool:
            return any(c == index and r.status_code == 200 and answer_of(r)[:2] == (variant, version)
                       for c, _, r in list(answers))

        def each(condition):
            def check() -> bool:
                raise_if_any_failed(futures)
                return condition()
            return check

        with ThreadPoolExecutor(clients) as executor:
            futures = [executor.submit(client, k) for k in range(clients)]
            try:
                wait_for(each(lambda: all(answered(k, "challenger", "2") for k in (1, 3))
                              and any(answered(k, "champion", "1") for k in (0, 2))),
                         "answers from the champion and the first challenger", timeout=60)
                publish(models.root, models.third)
                # Traffic keeps flowing through the reload until every challenger-bound client has the new one.
                wait_for(each(lambda: all(answered(k, "challenger", "3") for k in (1, 3))),
                         "the new challenger to answer every client sent to it", timeout=60,
                         detail=lambda: running.log()[-3000:])
            finally:
                stop.set()
        errors = exceptions_of(futures)
        assert not errors, errors  # no client died: a reset connection is a dropped request
        assert [sum(1 for c, *_ in answers if c == k) for k in range(clients)] == sent  # each request answered
        assert all(r.status_code == 200 for *_, r in answers), [r.text for *_, r in answers if r.status_code != 200][:3]
        versions = {answer_of(r)[:2] for *_, r in answers}
        assert versions <= {("champion", "1"), ("challenger", "2"), ("challenger", "3")}
        assert {("champion", "1"), ("challenger", "2"), ("challenger", "3")} <= versions
        for _, row, response in answers:
            _, version, probabilities = answer_of(response)
            np.testing.assert_allclose(probabilities[0], models.reference(version, pool[row : row + 1])[0], atol=1e-5)
        wait_for_challenger(running.url, "3")
        assert {httpx.get(f"{running.url}/metadata", timeout=10).json()["model_version"] for _ in range(6)} == {"1"}
        page = metrics(running.url)
        assert metric_value(page, "fluxo_challenger_reloads_total", outcome="ok") >= 2  # each worker at least once
        assert metric_value(page, "fluxo_model_reloads_total") == 0
