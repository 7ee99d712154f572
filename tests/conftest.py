"""Fixtures every test room shares (the toy model, a random-weight toy folder, a live server) and the `heavy`
marker: which tests `pytest -m "not heavy"` leaves out of the quick loop (`make test` runs them all)."""

import os
import warnings
from pathlib import Path

# Triton runs on CPU only in its interpreter, which must be chosen before anything imports triton.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("DISTILLERY_TEST_THREADS", "2")))

from distillery.model import DiffusionModel  # noqa: E402
from distillery.paths import EMBEDDED_MODEL  # noqa: E402
from distillery.testing.launch import serve_subprocess  # noqa: E402


@pytest.fixture(scope="session")
def toy_model() -> DiffusionModel:
    return DiffusionModel.from_pretrained(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def random_toy_folder(tmp_path_factory):
    """The toy architecture with random weights: for mechanics that need no trained model."""
    from diffusers import StableDiffusionPipeline

    from distillery.distill.toy import architecture

    torch.manual_seed(0)
    tokenizer = architecture.build_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=architecture.build_vae(), text_encoder=architecture.build_text_encoder(len(tokenizer)), tokenizer=tokenizer,
        unet=architecture.build_unet(), scheduler=architecture.build_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("random_toy")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def random_toy_xl_folder(tmp_path_factory):
    """The SDXL-family toy architecture with random weights, written by stock StableDiffusionXLPipeline."""
    from diffusers import StableDiffusionXLPipeline

    from distillery.distill.toy import architecture

    torch.manual_seed(0)
    tokenizer = architecture.build_tokenizer()
    text_encoder, text_encoder_2 = architecture.build_xl_text_encoders(len(tokenizer))
    pipe = StableDiffusionXLPipeline(
        vae=architecture.build_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=architecture.build_xl_unet(), scheduler=architecture.build_scheduler(),
        add_watermarker=False)
    folder = tmp_path_factory.mktemp("random_toy_xl")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd2_style_folder(random_toy_folder, tmp_path_factory):
    """The random toy as SD 2.x configures its models: v-prediction, zero terminal SNR, trailing spacing, linear
    projections into attention, attention upcast."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(random_toy_folder, safety_checker=None)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(**{**config, "use_linear_projection": True, "upcast_attention": True})
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction",
                                               rescale_betas_zero_snr=True, timestep_spacing="trailing")
    folder = tmp_path_factory.mktemp("sd2_style")
    pipe.save_pretrained(folder)
    return folder


READY_WITHIN_S = 60  # the README promises an answer within a minute of `make serve`


@pytest.fixture(scope="session")
def running_server():
    """`distillery serve` (uvicorn, the embedded model) on a loopback port; yields its URL."""
    with serve_subprocess(ready_within_s=READY_WITHIN_S) as url:
        yield url


# Heavy: over ~5 s on the 2-core machine because it trains, starts a server process, a browser or Prometheus,
# compiles, or runs the benchmarks. Named here, by file, by test or by the fixture that costs, so the quick
# loop is decided in one place (a file may also mark itself: pytestmark); a slow-marked test is heavy too.
HEAVY_FILES = {
    "serving/test_openapi_conformance.py": "schemathesis over a live server",
    "serving/test_uvicorn_e2e.py": "uvicorn in a subprocess",
    "serving/test_client_apis.py": "a live server and the real client libraries",
    "serving/test_playground.py": "headless Chromium against a live server",
    "serving/test_pruned_base.py": "a live server on the pruned base",
    "serving/test_sdxl_family.py": "an SDXL-family app per LoRA backend, and a compiled slot UNet",
    "serving/test_toy_xl_served.py": "a live server on toy-xl and the real client libraries",
    "deploy/test_prometheus_scrape.py": "a real Prometheus scraping a live server",
    "distill/test_distributed.py": "distillers under accelerate launch, 2 processes",
    "distill/test_no_side_effects.py": "train-toy and distill-guidance runs",
    "distill/test_sdxl_family.py": "three distillers' runs on an SDXL-family base",
    "kernels/test_lora_triton_compiles.py": "Triton and ptxas compile for sm_90",
    "sampling/test_deterministic.py": "crowds of requests, row by row, through every backend",
    "test_bench_references.py": "evaluation sets and FID references rendered, some twice",
}
HEAVY_TESTS = {  # file -> its heavy tests: a name (every parametrization) or name[id] (that one)
    "adapters/test_slots.py": {"test_no_recompiles_across_swaps_sets_weights_w_and_bucketed_batch_sizes"},  # compiles
    "adapters/test_loaded.py": {"test_kohya_file_serves_what_peft_computes"},  # peft and the served UNet, twice
    "adapters/test_backends.py": {"test_every_backend_gives_the_reference_eps"},  # each backend, Triton interpreted
    "distill/test_atomic_artefacts.py": {  # accelerate launch, 2 processes
        "test_two_processes_write_one_checkpoint_and_a_resume_goes_on_from_it"},
    "distill/test_fid_and_style.py": {"test_fid_sees_a_one_pixel_blur_that_alignment_cannot"},  # renders and FIDs
    "distill/test_prediction_types.py": {  # a distillation run
        "test_a_consistency_adapter_trains_on_a_v_prediction_zero_snr_base_and_serves"},
    "distill/test_guidance_distill.py": {"test_untrained_student_equals_conditional_teacher_and_shares_w0"},  # peft
    "distill/test_pruning.py": {  # an SD-1.5-shaped UNet
        "test_pruned_unet_holds_the_teachers_remaining_weights_and_the_teacher_is_untouched",
        "test_dropping_the_mid_block_leaves_the_down_path_exactly_as_it_was"},
    "distill/test_style_lora.py": {"test_style_lora_trains_and_loads_as_a_style_adapter"},  # a training run
    "distill/test_step_distill.py": {  # distillation runs
        "test_consistency_adapter_starts_from_the_guidance_adapter_and_serves_with_lcm_in_few_steps",
        "test_progressive_rounds_chain_teacher_to_student_and_a_finished_round_is_not_rerun"},
    "serving/test_bad_adapters.py": {  # a server process
        "test_a_server_started_on_a_root_with_broken_adapters_serves_the_good_ones"},
    "serving/test_compiled.py": {"test_compiled_server_serves_the_same_images_without_recompiling",  # compiles
                                 "test_a_new_size_runs_eagerly_while_its_graph_compiles_beside_the_serving",
                                 "test_the_compile_thread_makes_more_graphs_than_dynamos_default_limit"},
    "test_bench_smoke.py": {"test_benchmark_quick_mode", "test_gpu_suite_cpu_smoke"},  # the benchmarks themselves
    "test_layout.py": {"test_distillery_serve_loads_no_training_code", "test_pip_install_target_holds_only_distillery"},
    "test_model_loading.py": {"test_sd15_shaped_folder_loads_and_samples_with_the_same_code"},  # an SD-1.5 UNet
}
HEAVY_FIXTURES = {
    "running_server": "a server process",
    "trained_adapter": "a distillation run",
    "pruned_folder": "a pruning run",
    "killed_saves": "training runs killed at each save step",
}
TESTS_DIR = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    modules = {}
    for item in items:
        path = item.path.relative_to(TESTS_DIR).as_posix()
        modules[path] = item.module
        if (path in HEAVY_FILES or HEAVY_TESTS.get(path, set()) & {item.originalname, item.name}
                or HEAVY_FIXTURES.keys() & set(item.fixturenames) or item.get_closest_marker("slow")):
            item.add_marker(pytest.mark.heavy)
    # a renamed test would silently join the quick loop: say so
    stale = [f"{path}::{name}" for path, module in modules.items() for name in HEAVY_TESTS.get(path, ())
             if not hasattr(module, name.partition("[")[0])]
    if stale:
        warnings.warn(pytest.PytestWarning(f"HEAVY_TESTS names tests that no longer exist: {stale}"))
