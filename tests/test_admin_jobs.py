"""Iterations started from the admin page run the real `dialoop iterate` on a tiny model: live progress, the
new policy served and listed in the chat, its report card; a failure says why; a cancel interrupts the run."""

from __future__ import annotations

import dataclasses
import datetime
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from admin_data import seed_store
from pydantic import ValidationError
from sqlalchemy import Engine
from webclient import WebClient, live_web_server

from dialoop.iteration import IterationKnobs, IterationProgress, StageProgress
from dialoop.serve.app import create_app, serve_in_background
from dialoop.serve.jobs import IterationJob, IterationSettings, JobManager, cli_args, iteration_knobs
from dialoop.serve.sessions import configure_auth
from dialoop.settings import WebSettings
from dialoop.store import session_scope
from dialoop.store.db import make_engine
from dialoop.store.models import AdminJob, ModelVersion, TrainingRun, utcnow

HTML = {"Accept": "text/html"}


def tiny_settings(model: Path, **overrides: str) -> dict[str, str]:
    """The iteration form filled in for a tiny model: a few steps per stage, a 4-prompt report card."""
    fields = {
        "base_model": str(model),
        "sft_steps": "2",
        "rm_steps": "2",
        "ppo_steps": "2",
        "ppo_batch_size": "2",
        "max_new_tokens": "8",
        "eval_prompts": "4",
        "seed": "0",
        "precision": "fp32",
        "deploy": "1",
    }
    return {**fields, **overrides}


@pytest.fixture(autouse=True)
def quiet_children(monkeypatch: pytest.MonkeyPatch) -> None:
    """The iteration's process inherits these: one CPU thread (the machine is shared), no hub access."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def start(client: WebClient, fields: dict[str, str]) -> int:
    client.page("/admin/iterations")
    response = client.http.post("/admin/iterations", data={**fields, "csrf_token": client.csrf}, headers=HTML)
    assert response.status_code == 303, response.text
    return int(response.headers["location"].rsplit("-", 1)[1])


def follow(
    client: WebClient, job_id: int, until: Callable[[dict[str, Any]], bool], timeout: float = 240
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Poll the job's progress as the page does until `until(progress)`; (last progress, every one seen)."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.api("GET", f"/admin/api/jobs/{job_id}")
        assert response.status_code == 200
        seen.append(response.json())
        if until(seen[-1]):
            return seen[-1], seen
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {seen[-1]}")


def ended(progress: dict[str, Any]) -> bool:
    return progress["status"] != "running"


@pytest.mark.e2e
def test_an_iteration_from_the_web_trains_serves_and_reports(tiny_model_dir: Path, tmp_path: Path) -> None:
    with live_web_server(f"sqlite:///{tmp_path / 'store.db'}", tiny_model_dir) as live:
        seed_store(live.app.state.engine, tiny_model_dir)
        root = live.client("root")
        page = root.page("/admin/iterations").text
        assert f'name="base_model" value="{tiny_model_dir}"' in page  # the store's base model by default
        job_id = start(root, tiny_settings(tiny_model_dir))
        again = root.http.post(
            "/admin/iterations", data={**tiny_settings(tiny_model_dir), "csrf_token": root.csrf}, headers=HTML
        )
        assert again.status_code == 409 and "an iteration is running already" in again.text

        final, seen = follow(root, job_id, ended)
        assert final["status"] == "done", final
        assert final["error"] is None and final["iteration"] == 1 and final["returncode"] == 0
        assert (final["policy_version"], final["served"]) == ("policy-1", True)
        stages = {s["name"]: s for s in final["stages"]}
        assert {name: s["status"] for name, s in stages.items()} == {
            "sft": "trained",
            "rm": "trained",
            "ppo": "trained",
            "eval": "trained",
        }
        assert (stages["ppo"]["step"], stages["ppo"]["total"]) == (2, 2) and "kl" in stages["ppo"]["metrics"]
        # the page saw the stages go by while the job ran
        running = {s["name"] for p in seen for s in p["stages"] if s["status"] == "running"}
        assert running, "no stage was ever seen running"

        # the new policy is served at once, and the chat's model picker lists it
        assert live.app.state.registry.served == "policy-1"
        models = root.api("GET", "/api/chat/models").json()
        assert models["served"] == "policy-1"
        assert {"sft-1", "policy-1"} <= {m["name"] for m in models["models"]}
        with session_scope(live.app.state.engine) as session:
            runs = session.query(TrainingRun).order_by(TrainingRun.id).all()
            assert [(r.stage, r.status, r.iteration) for r in runs] == [
                ("sft", "done", 1),
                ("rm", "done", 1),
                ("ppo", "done", 1),
            ]
            assert runs[0].config["max_steps"] == 2 and runs[0].data["conversation_ids"]
            policy = session.query(ModelVersion).filter_by(name="policy-1").one()
            assert policy.served and policy.metrics["eval"]["name"] == "policy-1"
            policy_id = policy.id

        # the report card: numbers, plots and the full report (sandboxed)
        versions = root.page("/admin/versions").text
        assert f'id="version-{policy_id}"' in versions and "Win rate vs SFT" in versions
        plot = root.page(f"/admin/versions/{policy_id}/report/gold_per_iteration.png")
        assert plot.status_code == 200 and plot.headers["content-type"] == "image/png"
        assert plot.content.startswith(b"\x89PNG")
        report = root.page(f"/admin/versions/{policy_id}/report/report.html")
        assert report.status_code == 200 and report.headers["content-security-policy"].startswith(
            "sandbox allow-same-origin;"
        )
        assert root.page(f"/admin/versions/{policy_id}/report/samples.txt").status_code == 404
        assert 'data-status="done"' in root.page("/admin/iterations").text

        # nothing new since: the next iteration fails, and says why
        second = start(root, tiny_settings(tiny_model_dir))
        failed, _ = follow(root, second, ended)
        assert failed["status"] == "failed" and "nothing new to learn from" in failed["error"]
        assert live.app.state.registry.served == "policy-1"


@pytest.mark.e2e
def test_cancelling_an_iteration_interrupts_its_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    # a server started in the background (`nohup dialoop serve &`) has SIGINT ignored, and its children
    # inherit that: the job must still turn the cancel into KeyboardInterrupt
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _cancel_an_iteration(tiny_model_dir, tmp_path)
    finally:
        signal.signal(signal.SIGINT, ignored)


def _cancel_an_iteration(tiny_model_dir: Path, tmp_path: Path) -> None:
    with live_web_server(f"sqlite:///{tmp_path / 'store.db'}", tiny_model_dir) as live:
        seed_store(live.app.state.engine, tiny_model_dir)
        root = live.client("root")
        job_id = start(root, tiny_settings(tiny_model_dir, sft_steps="100000"))

        def sft_training(progress: dict[str, Any]) -> bool:
            sft = progress["stages"][0]
            return ended(progress) or (sft["status"] == "running" and sft.get("step", 0) >= 2)

        progress, _ = follow(root, job_id, sft_training, timeout=120)
        assert progress["status"] == "running" and progress["stages"][0]["total"] == 100000
        response = root.http.post(
            f"/admin/jobs/{job_id}/cancel", data={"csrf_token": root.csrf}, headers=HTML
        )
        assert response.status_code == 303
        final, _ = follow(root, job_id, ended, timeout=150)  # the job allows `grace_s` = 60 s to unwind
        assert final["status"] == "cancelled" and "continues where this one stopped" in final["error"]
        assert final["stages"][0]["status"] == "cancelled" and final["policy_version"] is None
        jobs = live.app.state.jobs
        assert jobs.get(job_id).process.poll() is not None
        with session_scope(live.app.state.engine) as session:
            [run] = session.query(TrainingRun).all()
            assert run.stage == "sft" and run.status == "failed" and "KeyboardInterrupt" in (run.error or "")
            assert session.query(ModelVersion).filter(ModelVersion.run_id.is_not(None)).count() == 0
        again = root.http.post(f"/admin/jobs/{job_id}/cancel", data={"csrf_token": root.csrf}, headers=HTML)
        assert again.status_code == 409 and "not running" in again.text
        assert live.app.state.registry.served == "tiny"


def test_the_form_settings_are_the_iteration_knobs_with_their_bounds() -> None:
    knob_names = [f.name for f in dataclasses.fields(IterationKnobs)]
    assert list(IterationSettings.model_fields) == knob_names
    assert iteration_knobs({"sft_steps": "3", "precision": "fp32"}) == IterationKnobs(
        sft_steps=3, precision="fp32"
    )
    for bad in ({"sft_steps": 0}, {"ppo_lr": 1.5}, {"precision": "fp16"}, {"base_model": ""}, {"epochs": 1}):
        with pytest.raises(ValidationError):
            iteration_knobs(bad)
    knobs = IterationKnobs(ppo_steps=20, base_model="m", deploy=True)
    assert cli_args(knobs) == [
        "--base-model=m",
        "--ppo-steps=20",
        "--eval-prompts=128",
        "--seed=0",
        "--precision=auto",
        "--no-rm-feedback",
        "--rm-feedback-weight=1.0",
    ]
    assert "--rm-feedback" in cli_args(IterationKnobs(rm_feedback=True))


def test_job_progress_comes_from_the_progress_file_not_the_log(tmp_path: Path) -> None:
    work_dir = tmp_path / "runs"
    # progress() only reads files: no store or registry is touched
    jobs = JobManager(make_engine("sqlite://"), None, home=tmp_path, work_dir=work_dir)  # type: ignore[arg-type]
    log_path = tmp_path / "iterate.log"
    log_path.write_text("sft: start\nsft: done\nrm: start\nrm: done\nppo: skipped\n")  # what stdout says
    job = IterationJob(1, IterationKnobs(), "root", log_path, started_at=time.time() - 5)
    assert [s["status"] for s in jobs.progress(job)["stages"]] == ["pending"] * 4  # no file yet

    IterationProgress(
        iteration=3,
        updated_at=time.time(),
        stages={
            "sft": StageProgress(status="reused", seconds=0.0, note="no new demonstrations", version_id=7),
            "rm": StageProgress(status="running", started_at=time.time()),
        },
    ).write(work_dir / "iter-3")
    progress = jobs.progress(job)
    assert progress["iteration"] == 3
    assert [(s["name"], s["status"], s["note"]) for s in progress["stages"]] == [
        ("sft", "reused", "no new demonstrations"),
        ("rm", "running", ""),
        ("ppo", "pending", ""),
        ("eval", "pending", ""),
    ]
    assert progress["stages"][1]["step"] == 0  # the running stage's training progress (no metrics yet)
    assert "rm: done" in progress["log_tail"]  # the log is still shown

    job.status = "cancelled"  # the child stopped mid-stage
    assert jobs.progress(job)["stages"][1]["status"] == "cancelled"


# --- issue #20, item 5: the admin's job history was lost on restart -------------------------------------


@pytest.mark.e2e
def test_a_job_running_when_the_server_stopped_is_interrupted_after_a_restart_and_resumes(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with live_web_server(url, tiny_model_dir) as live:
        seed_store(live.app.state.engine, tiny_model_dir)
        root = live.client("root")
        job_id = start(root, tiny_settings(tiny_model_dir, sft_steps="100000"))
        follow(root, job_id, lambda p: p["iteration"] is not None or ended(p), timeout=120)
        child = live.app.state.jobs.get(job_id).process
    # the server stopped (its lifespan ended) while the job ran: the child was interrupted
    assert child.wait(timeout=90) is not None

    restarted = create_app(database_url=url, model=tiny_model_dir, model_name="tiny")
    configure_auth(restarted, WebSettings(secret_key="test-signing-key"))
    with serve_in_background(restarted) as base:
        root = WebClient(httpx.Client(base_url=base, timeout=60))
        assert root.login("root").status_code == 303
        [old] = root.api("GET", "/admin/api/jobs").json()
        assert old["id"] == job_id and old["status"] == "interrupted" and "resume it" in old["error"]
        assert "Resume" in root.page("/admin/iterations").text
        response = root.http.post(
            f"/admin/jobs/{job_id}/resume", data={"csrf_token": root.csrf}, headers=HTML
        )
        assert response.status_code == 303, response.text
        new_id = int(response.headers["location"].rsplit("-", 1)[1])
        resumed = root.api("GET", f"/admin/api/jobs/{new_id}").json()
        assert new_id != job_id and resumed["resumed_from"] == job_id
        assert resumed["settings"]["sft_steps"] == 100000 and resumed["status"] == "running"
        again = root.http.post(f"/admin/jobs/{job_id}/resume", data={"csrf_token": root.csrf}, headers=HTML)
        assert again.status_code == 409  # one at a time
        root.http.post(f"/admin/jobs/{new_id}/cancel", data={"csrf_token": root.csrf}, headers=HTML)
        final, _ = follow(root, new_id, ended, timeout=150)
        assert final["status"] == "cancelled"


def test_jobs_are_shared_and_a_lost_servers_running_job_is_interrupted(
    engine: Engine, tmp_path: Path
) -> None:
    """Jobs are rows of the store: another process lists them; one whose server stopped beating (a crash)
    shows as interrupted, while one whose server is alive stays running."""
    with session_scope(engine) as session:
        for heartbeat in (utcnow() - datetime.timedelta(minutes=5), utcnow()):
            session.add(
                AdminJob(
                    settings={"sft_steps": 3}, started_by="root", log_path="x.log", heartbeat_at=heartbeat
                )
            )
    jobs = JobManager(engine, None, home=tmp_path, work_dir=tmp_path / "runs")  # type: ignore[arg-type]
    alive, lost = jobs.list()
    assert (lost.status, alive.status) == ("interrupted", "running")
    assert "resume it" in (lost.error or "") and lost.settings.sft_steps == 3
    with session_scope(engine) as session:
        assert session.get(AdminJob, lost.id).status == "interrupted"  # type: ignore[union-attr]
    assert jobs.running() is not None and jobs.running().id == alive.id  # type: ignore[union-attr]
