"""The engine under any request mix: sizes, modes, schedulers and adapters share it; a budget of
latent pixels per step; timeouts; a request that fails alone fails alone; a dead worker is loud."""

import asyncio
import io

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.serving import engine as engine_module
from distillery.serving import stepping as stepping_module
from distillery.serving.admission import MAX_OVERTAKES, Admission
from distillery.serving.app import create_app
from distillery.serving.config import Settings
from distillery.serving.engine import Engine
from distillery.serving.jobs import InFlight, Job, RequestTimeout


def _engine(**kw) -> Engine:
    engine = Engine(DiffusionModel.from_pretrained(EMBEDDED_MODEL), **kw)
    engine.load_adapters_from(EMBEDDED_ADAPTERS)
    return engine


def test_every_size_mode_and_scheduler_in_flight_together_over_http(running_server):
    """Every allowed size (toy: multiples of 8 up to 64), CFG and single-eval, three schedulers, all at
    once: every answer 200 with the size it asked for."""
    model = httpx.get(f"{running_server}/model").json()
    sizes = list(range(model["size_step"], 2 * model["native_size"] + 1, model["size_step"]))
    bodies = []
    for i, height in enumerate(sizes):
        width = sizes[(i * 3 + 1) % len(sizes)]
        body = {"prompt": "a red circle", "steps": 3 + i % 3, "seed": i, "height": height, "width": width,
                "scheduler": ["ddim", "euler", "dpm"][i % 3]}
        if i % 2:
            body |= {"adapters": [{"name": "guidance-toy"}], "guidance": 2.0}
        bodies.append(body)

    async def send_all():
        async with httpx.AsyncClient(base_url=running_server, timeout=120) as client:
            return await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))

    responses = asyncio.run(send_all())
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text[:200] for r in responses]
    for body, r in zip(bodies, responses):
        assert Image.open(io.BytesIO(r.content)).size == (body["width"], body["height"])
        assert r.headers["x-mode"] == ("single-eval" if "adapters" in body else "cfg")


def test_a_step_holds_at_most_max_rows_of_native_latent_pixels():
    """A 2x-size CFG request costs 8 native rows: with a budget of 10 it runs beside one more CFG
    request of the native size, not beside three; a request alone always runs, even over budget."""
    engine = _engine(max_rows=10)
    big, small = Job("x", 1.0, 2, 0, height=64, width=64), Job("x", 1.0, 2, 0)
    plans = {job: engine.plan(job)[2] for job in (big, small)}
    assert plans[big].step_cost(32) == 8 and plans[small].step_cost(32) == 2
    admission = engine.admission

    async def admitted(jobs):
        loop = asyncio.get_running_loop()
        admission.pending.extend(engine_module.InFlight(j, plans[j], (), loop.create_future(), 0.0,
                                                        plans[j].step_cost(32)) for j in jobs)
        active = []
        got = [a.job for a in admission.admit(active)[0]]
        admission.pending.clear()
        return got

    assert asyncio.run(admitted([big, small, small, small])) == [big, small]
    assert asyncio.run(admitted([big, big])) == [big]
    admission.max_rows = 4
    assert asyncio.run(admitted([big, small])) == [big]  # alone over budget: it still runs


def test_a_request_not_answered_in_time_is_a_timeout_and_the_engine_goes_on():
    async def scenario():
        engine = _engine(timeout_s=0.2)
        await engine.start()
        with pytest.raises(RequestTimeout, match="0.2 s"):
            await engine.submit(Job("a red circle", 1.0, 1000, 0))
        engine.timeout_s = 60
        result = await engine.submit(Job("a red circle", 1.0, 2, 0))
        await engine.stop()
        return result

    assert asyncio.run(scenario()).image.size == (32, 32)


def test_a_request_that_fails_alone_fails_alone(monkeypatch):
    """A request whose own steps raise gets its error; the requests sharing its steps are answered."""
    real_start = stepping_module.start_denoising

    def start(model, prompt, *args, **kw):
        request = real_start(model, prompt, *args, **kw)
        if prompt == "poison":
            request.sampler.rows = lambda: (_ for _ in ()).throw(RuntimeError("poisoned rows"))
        return request

    monkeypatch.setattr(stepping_module, "start_denoising", start)

    async def scenario():
        engine = _engine()
        await engine.start()
        jobs = [Job("a red circle", 1.0, 4, i) for i in range(3)] + [Job("poison", 1.0, 4, 9)]
        results = await asyncio.gather(*(engine.submit(j) for j in jobs), return_exceptions=True)
        after = await engine.submit(Job("a blue square", 1.0, 2, 0))
        await engine.stop()
        return results, after

    results, after = asyncio.run(scenario())
    assert [type(r).__name__ for r in results] == ["Result"] * 3 + ["RuntimeError"]
    assert after.image.size == (32, 32)


def test_a_dead_worker_makes_readyz_fail_and_requests_503():
    deaths = []
    settings = Settings(exit_on_worker_death=False)
    with TestClient(create_app(settings)) as client:
        engine = client.app.state.engine
        assert client.get("/readyz").status_code == 200
        engine.on_death = deaths.append

        def broken_admit(active):
            raise RuntimeError("a bug in the worker loop")

        engine.admission.admit = broken_admit
        resp = client.post("/generate", json={"prompt": "a red circle", "steps": 2})
        assert resp.status_code == 503 and "worker died" in resp.text and int(resp.headers["retry-after"]) > 0
        assert client.get("/readyz").status_code == 503
        assert client.post("/generate", json={"prompt": "a red circle", "steps": 2}).status_code == 503
        assert client.get("/healthz").status_code == 503  # the liveness probe restarts it
    assert len(deaths) == 1 and "a bug in the worker loop" in str(deaths[0])


def test_evicted_adapters_are_not_read_back_on_the_event_loop():
    engine = _engine()
    engine.registry.resident.pop("guidance-toy")  # evicted
    job = Job("x", 1.0, 2, 0, adapters=(("guidance-toy", 1.0),))
    loads = engine.registry.loads
    assert engine.plan(job, reload=False) is None and engine.registry.loads == loads  # no disk read
    assert engine.plan(job)[1][0][0].name == "guidance-toy" and engine.registry.loads == loads + 1


def test_admission_lets_small_requests_pass_a_large_one_but_never_starves_it():
    """A waiting request too large for the budget left beside what runs lets later ones that fit go ahead (no
    head-of-line blocking), at most MAX_OVERTAKES times; then it is next, and what runs drains until it fits."""
    async def scenario():
        loop = asyncio.get_running_loop()
        admission = Admission(queue_size=100, max_rows=9)  # beside the running 6: one small (2) at a time

        def item(cost):
            return InFlight(Job("x", 1.0, 2, 0), None, (), loop.create_future(), 0.0, cost)

        running, large = item(6), item(8)
        active = [running]
        smalls = [item(2) for _ in range(MAX_OVERTAKES + 3)]
        for waiting in [large, *smalls]:
            admission.enqueue(waiting)
        admitted = []
        for _ in range(MAX_OVERTAKES):  # each round: the small one admitted runs one step and finishes
            got, _ = admission.admit(active)
            admitted += got
            for done in got:
                active.remove(done)
        assert admitted == smalls[:MAX_OVERTAKES] and large.overtaken == MAX_OVERTAKES
        assert admission.admit(active) == ([], [])  # the large one's turn: nobody passes it again
        active.remove(running)
        assert admission.admit(active)[0] == [large]  # alone it always fits
        cancelled = smalls[-1]
        cancelled.future.cancel()
        assert admission.withdraw(cancelled) and not admission.withdraw(cancelled)

    asyncio.run(scenario())
