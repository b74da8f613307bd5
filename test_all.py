"""Every test of the project: `python -m pytest -q test_all.py` (a few minutes on a 2-core CPU, no network).

Parity tests rebuild the reference weights with the fill rule of tests/parity (copied from shared/parity,
see its README), map them to our names, feed the stored inputs and compare with the stored outputs.

Map, from the paper's ideas and the project's guarantees to the tests (`pytest -k NAME` runs one):

  The method
    the images (built-in shapes, ADM's center crop, 16-bit files):
      test_synthetic_data_is_deterministic_and_balanced, test_adm_center_crop,
      test_sixteen_bit_greyscale_is_scaled
    FSD + RAD (semantic decoder on z_tau, masked):
      test_semantic_decoder_parity, test_stage1_forward_and_losses_parity,
      test_mlp_semantic_decoder_is_the_authors
    the flow z_tau, the shift, tau schedules:
      test_posterior_and_flow_parity, test_draw_tau_schedules, test_gamma_zero_turns_the_flow_off,
      test_transport_parity
    MAE masking (RAD's input):
      test_mask_ratio_distribution, test_encoder_parity
    the tokenizer's other nets (pixel decoder, the whole reconstruction):
      test_pixel_decoder_parity, test_full_reconstruct_parity
    the teacher (DINOv2/v3, stand-in):
      test_teacher_parity, test_teacher_preprocess_parity, test_teacher_targets_in_stage1_forward,
      test_teacher_rope_jitter_is_drawn_in_train_mode_only, test_dinov2_teacher_sees_the_tokenizer_grid
    losses (LPIPS, ConvNeXt, PatchGAN):
      test_lpips_parity, test_convnext_perceptual_parity, test_patchgan_parity,
      test_perceptual_gradient_matches_one_batched_pass,
      test_discriminator_step_reads_every_micro_batch_and_is_clipped
    stage 2 (decoder fine-tuning):
      test_finetune_changes_only_the_decoder, test_finetune_preset_is_the_released_stage2_recipe
    reconstruction evaluation (PSNR, rFID):
      test_evaluate_writes_metrics, test_evaluate_rfid, test_evaluate_on_another_data_set_keeps_the_first
    the latent cache:
      test_cache_is_complete_and_matches_the_model, test_cache_reader
    DiT^DH and its sampler:
      test_ditdh_forward_parity, test_sampler_parity, test_guidance_acts_only_inside_its_interval,
      test_dit_loss_falls,
      test_sampler_reads_nothing_back_from_the_device, test_sampling_fid_and_autoguidance
    FID / IS / P&R, the offline judge:
      test_fid_inception_parity, test_tf1_resize_parity, test_frechet_parity, test_inception_score_parity,
      test_fid_inception_loaded_channels_last, test_frechet_closed_forms,
      test_too_few_samples_for_a_covariance_warn, test_precision_recall_on_shifted_sets,
      test_fid_cli_and_sources_agree, test_reference_batch_statistics_are_used_as_stored,
      test_fid_refuses_objects_and_statistics_that_are_no_covariance,
      test_judge_scores, test_judge_must_know_the_samples_classes
    linear probing:
      test_probe_finds_planted_linear_structure, test_research_probe_is_adam_at_a_constant_lr,
      test_research_probe_defaults_are_the_authors_whatever_the_preset,
      test_probe_training_views, test_probe_heads_train_on_the_run_device,
      test_probe_random_labels_stay_near_chance
  Guarantees
    released weights load (strict keys):
      test_official_*_keys_load_strictly, test_load_released_tokenizer_layout,
      test_load_dit_official_ema_without_buffers, test_sampling_from_released_layout,
      test_finetune_from_the_released_stage1_layout, test_official_dinov2_layouts_have_meta_shapes,
      test_safetensors_reader, test_build_teacher_from_hf_safetensors
    exact resume (stop + resume = uninterrupted):
      test_*_resume_is_exact, test_*_two_processes_resume_exactly,
      test_interrupted_encode_resumes_to_the_same_files, test_interrupted_sampling_resumes_to_the_same_set,
      test_checkpoints_at_every_epoch_end, test_dit_is_the_same_with_loader_workers,
      test_same_tokenizer_whether_or_not_the_teacher_existed
    rank independence (2 gloo processes):
      test_standin_two_process_gloo, test_tokenizer_without_masking_on_two_processes,
      test_cache_same_with_two_processes,
      test_sampling_is_the_same_on_two_processes, test_fid_features_two_processes_equal_one,
      test_fid_ranks_use_their_own_gpu,
      test_evaluate_two_processes_equal_one, test_probe_two_processes_equal_one,
      test_ranks_agree_check_and_broadcast,
      test_standin_accuracy_is_rank_0s_weights_on_every_image, test_weights_are_downloaded_once_per_machine,
      test_image_folder_check_is_shared_by_the_ranks
    speed (no host read in a step, --bench):
      test_a_training_step_reads_nothing_back_from_the_device, test_sampler_reads_nothing_back_from_the_device,
      test_bench_is_one_rule_in_every_trainer, test_image_npz_is_read_by_shard_not_whole
    the paper's recipe on 80 GB cards (micro-batches, checkpointing, bf16, TF32, compile, mapped files):
      test_dit_grad_accum_is_one_larger_batch, test_grad_checkpoint_keeps_loss_and_gradients_with_fewer_activations,
      test_the_bf16_path_runs_on_the_cpu, test_tf32_in_the_trainers_never_in_the_fid_inception,
      test_compiled_steps_equal_eager_ones, test_checkpoints_are_memory_mapped_not_read_whole
    long runs on a shared cluster (preemption, one run per folder, open files):
      test_preemption_saves_the_step_and_resumes_exactly, test_encode_and_sampling_stop_after_the_batch_on_a_signal,
      test_one_run_per_folder, test_long_one_sided_work_outwaits_the_timeout,
      test_a_resume_continues_only_the_run_it_saved, test_sampling_retries_with_smaller_batches,
      test_a_cache_of_many_shards_keeps_few_files_open
    on a GPU only (test_cuda_*, skipped elsewhere; .ci/gpu runs them):
      test_cuda_trainers_take_bf16_steps, test_cuda_compile_equals_eager, test_cuda_sampler_and_one_process_nccl,
      test_cuda_memory_report_at_ditdh_s_size
    recipe defaults and the command line:
      test_presets_are_the_parser_defaults,
      test_tokenizer_bench_needs_no_earlier_stage, test_dit_bench_needs_no_cache,
      test_paper_presets_decode_images_with_enough_workers, test_dit_says_when_previews_are_off,
      test_every_stage_calls_its_batch_per_process_batch_size,
      test_each_stage_reads_the_default_output_of_the_stage_before, test_help_prints_each_docstring_line_as_written,
      test_counts_and_sizes_must_be_at_least_one, test_flags_that_act_only_with_another_are_refused_without_it,
      test_numbers_that_make_no_sense_are_refused_at_the_command_line,
      test_weight_decay_skips_embeddings_and_tokens, test_dit_lr_decay_ends_at_its_own_epoch
    bad input, clear errors:
      test_*_bad_inputs, test_*_errors, test_image_folder_errors, test_dit_mismatch_errors,
      test_unwritable_out_and_full_disk, test_encode_refuses_to_resume_into_a_cache_of_other_images,
      test_evaluate_reference_statistics_are_named_by_their_images,
      test_sampling_refuses_a_folder_made_otherwise, test_build_teacher_rejects_wrong_architecture,
      test_dit_resume_refuses_other_latents_or_global_batch
    checkpoint safety (and the checkout is left alone: the_checkout_is_left_alone, around every test):
      test_no_loader_runs_code_from_a_checkpoint, test_wrong_or_damaged_checkpoints_say_what_they_are,
      test_divergence_stops_before_anything_is_saved, test_tokenizer_logs_and_watches_the_mean_over_micro_batches,
      test_a_damaged_latent_cache_is_named_not_the_learning_rate, test_weights_that_are_nan_are_refused_when_loaded,
      test_fid_files_are_written_atomically
    the whole pipeline:
      test_pipeline_end_to_end
    your own images and weights (Python API, reconstructions, folders read whole, traceable outputs):
      test_tokenizer_api_takes_images_and_returns_the_decoders_latent, test_readme_python_block_runs,
      test_one_folder_reader_for_every_stage_and_fid, test_reconstruct_writes_each_image_under_its_name,
      test_probe_holds_out_a_disjoint_split, test_standin_teacher_must_have_trained_on_the_data,
      test_cache_names_its_files_and_resumes_only_over_them, test_bad_files_never_cost_a_run,
      test_weight_flags_take_urls
    the README's map of the paper:
      test_the_readmes_paper_to_code_map_names_real_code
    this map names every test:
      test_the_map_names_every_test

Layout: parity machinery, the fixtures (one run chain shared by all), then one section per file, each
ordered parity, numerics, runs, errors.
"""
import copy
import json
import math
import os
import errno
import pathlib
import fnmatch
import glob
import http.server
import random
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import warnings
import zlib

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import dit
import distill
import fid
import probe
import sample
import tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
PARITY = os.environ.get("RECTOK_PARITY", os.path.join(HERE, "tests", "parity"))  # another vector set: its folder


#################################################################################
#                               Parity machinery                                #
#################################################################################


def fill_tensor(key, shape, prefix=""):
    """The weight rule of tests/parity/README.md: one seeded draw per key, by suffix and rank."""
    shape = [int(s) for s in shape]
    g = torch.Generator().manual_seed(zlib.crc32((prefix + key).encode("utf-8")))
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=g) + 0.5
    if len(shape) == 1 and key.split(".")[-1] == "W":
        return torch.randn(shape, generator=g)
    if len(shape) == 1 and key.endswith(("weight", "gamma")):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if len(shape) == 1:
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return 0.02 * torch.randn(shape, generator=g)


def reference_weights(spec):
    """The weights of a vector file's model, or of one of its extra_models: the rule under its own
    weight_prefix, then its fixed tensors."""
    w = {k: fill_tensor(k, s, spec["weight_prefix"]) for k, s in spec["state_dict_shapes"].items()
         if k not in spec["fixed_keys"]}
    w.update(spec["fixed_tensors"])
    return w


def parity(name):
    """(vector file, reference weights) for tests/parity/<name>.pt."""
    d = torch.load(os.path.join(PARITY, name + ".pt"), weights_only=True)
    return d, reference_weights(d)


def assert_supported(where, config, **ours):
    """Reference settings this implementation has one value for: a vector set made with another value fails
    here, naming the setting, rather than being compared with a model built otherwise."""
    other = {k: config[k] for k, v in ours.items() if k in config and config[k] != v}
    assert not other, f"{where}: {other} is not implemented here (ours: { {k: ours[k] for k in other} })"


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def torchrun(script, args, nproc=2):
    """`torchrun --nproc_per_node=2 script args` on gloo, as users run a stage; returns the finished run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           script if os.path.isabs(script) else os.path.join(HERE, script), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


def assert_same_runs(a, b, parts):
    """Two run folders whose latest.pt hold bit-identical `parts` (model, ema, ...) at the same step."""
    ca, cb = (torch.load(os.path.join(x, "latest.pt"), weights_only=True) for x in (a, b))
    assert ca["step"] == cb["step"]
    for part in parts:
        assert ca[part].keys() == cb[part].keys()
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    return ca


#################################################################################
#   Fixtures: the run chain standin_teacher -> stage1_run -> cache -> dit_run   #
#################################################################################

# Each fixture is a real run of a stage at a tiny size, made once per test session and shared.


@pytest.fixture(autouse=True)
def the_checkout_is_left_alone():
    """No test writes into the checkout: a default --out there (runs/...) would put test outputs among a
    user's runs. The names at the top and in runs/ are compared (__pycache__ and pytest's cache aside)."""
    def names():
        top = set(os.listdir(HERE)) - {"__pycache__", ".pytest_cache"}
        runs = os.path.join(HERE, "runs")
        return top | {os.path.join("runs", n) for n in (os.listdir(runs) if os.path.isdir(runs) else [])}

    before = names()
    yield
    assert names() == before, f"the test wrote {sorted(names() - before)} into {HERE}"


STANDIN_TINY = ["--image-size", "32", "--patch-size", "8", "--width", "32", "--depth", "1", "--heads", "2",
                "--num-train", "256", "--num-val", "64", "--batch-size", "32", "--epochs", "2",
                "--workers", "0", "--log-every", "4"]


def tok_args(teacher, out, *extra):
    """A small stage-1 run; teacher None: no semantic decoder (--sem-decoder none), so no teacher flags."""
    semantic = ["--sem-size", "mini", "--teacher-weights", teacher] if teacher else ["--sem-decoder", "none"]
    return ["--image-size", "32", "--patch-size", "8", "--channels", "8", "--encoder-size", "mini",
            "--decoder-size", "mini", "--num-train", "128", "--batch-size", "16", "--epochs", "1",
            "--workers", "0", "--log-every", "2", "--grid-every", "0", *semantic, "--out", out, *extra]


def encode_args(ckpt, out, *extra):
    """40 images in shards of 16 (16 + 16 + 8), batches of 12 that straddle shard boundaries."""
    return ["encode", "--ckpt", ckpt, "--out", out, "--num-train", "40", "--batch-size", "12",
            "--shard-size", "16", "--workers", "0", *extra]


def read_cache_array(root, name):
    """One array of a latent cache, its shards joined in index order."""
    meta = tokenizer.check_meta(root, {})
    return np.concatenate([tokenizer.open_shard(root, meta, k, "r")[name] for k in range(meta["num_shards"])])


def dit_args(cache, out, *extra):
    return ["--latents", cache, "--out", out, "--model", "tiny", "--batch-size", "8", "--epochs", "2",
            "--workers", "0", "--log-every", "1", "--preview-every", "0", *extra]


def sample_args(ckpt, out, *extra):
    return ["--dit", ckpt, "--out", out, "--num-images", "14", "--steps", "4", "--batch-size", "4", *extra]


@pytest.fixture
def parity_sizes(monkeypatch):
    """The tiny sizes the reference added to its SIZE_DICT, under the names its configs use."""
    for name in ("tokenizer_encoder", "tokenizer_pixel_decoder", "tokenizer_semantic_decoder",
                 "tokenizer_full_reconstruct", "tokenizer_stage1_forward"):
        c = torch.load(os.path.join(PARITY, name + ".pt"), weights_only=True)["config"]
        entries = c.get("size_dict_entries") or {c["model_size"]: c["size_dict_entry"]}
        for key, e in entries.items():
            size = c.get(key, key)  # full_reconstruct keys its entries by the config field
            monkeypatch.setitem(tokenizer.SIZES, size, (e["width"], e["layers"], e["heads"]))


@pytest.fixture
def tiny_arch(monkeypatch):
    """A tiny DINOv3 registered as an official architecture, with HF weights saved as safetensors."""
    d, w = parity("teacher_dinov3_hf")
    monkeypatch.setitem(distill.ARCHS, "dinov3_tiny", vit_config(d["config"]))
    return d, w


@pytest.fixture(scope="module")
def standin_teacher(tmp_path_factory):
    """A stand-in teacher for 32 px images with a 4 x 4 grid, trained for a few steps."""
    out = str(tmp_path_factory.mktemp("teacher"))
    distill.main(STANDIN_TINY + ["--out", out, "--epochs", "1"])
    return os.path.join(out, "teacher.pt")


@pytest.fixture(scope="module")
def stage1_run(standin_teacher, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stage1"))
    tokenizer.main(tok_args(standin_teacher, out, "--stop-at", "3"))
    return os.path.join(out, "latest.pt")


@pytest.fixture(scope="module")
def cache(stage1_run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache"))
    tokenizer.main(encode_args(stage1_run, out))
    return out


@pytest.fixture(scope="module")
def dit_run(cache, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dit"))
    dit.main(dit_args(cache, out, "--stop-at", "2"))
    return os.path.join(out, "latest.pt")


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    """Deterministic Inception weights and two small image sets as .npz and as a folder."""
    root = tmp_path_factory.mktemp("fid")
    _, w = parity("fid_inception_torch_fidelity")
    torch.save(w, root / "inception.pth")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(12, 48, 48, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(7, 40, 40, 3), dtype=np.uint8)
    np.savez(root / "a.npz", arr_0=a)
    np.savez(root / "b.npz", arr_0=b)
    (root / "a_png").mkdir()
    for i, img in enumerate(a):
        Image.fromarray(img).save(root / "a_png" / f"{i:06d}.png")
    return root


#################################################################################
#                         Teacher (distill.py): parity                          #
#################################################################################


def vit_config(c):
    """Our DinoViT arguments from a reference config (transformers or Meta)."""
    if "hidden_size" in c:  # transformers
        v3 = c["model_type"] == "dinov3_vit"
        return dict(img_size=c["image_size"], patch_size=c["patch_size"], width=c["hidden_size"],
                    depth=c["num_hidden_layers"], heads=c["num_attention_heads"],
                    mlp_ratio=c["intermediate_size"] / c["hidden_size"] if v3 else c["mlp_ratio"],
                    num_registers=c.get("num_register_tokens", 0), pos="rope" if v3 else "abs",
                    rope_theta=c.get("rope_theta", 100.0), ln_eps=c["layer_norm_eps"],
                    pos_interp="hf_antialias" if c.get("num_register_tokens") else "hf")
    v3 = "n_storage_tokens" in c
    return dict(img_size=c["img_size"], patch_size=c["patch_size"], width=c["embed_dim"], depth=c["depth"],
                heads=c["num_heads"], mlp_ratio=c["ffn_ratio"] if v3 else c["mlp_ratio"],
                num_registers=c["n_storage_tokens"] if v3 else c["num_register_tokens"],
                pos="rope" if v3 else "abs", rope_theta=c.get("pos_embed_rope_base", 100.0),
                ln_eps=1e-5 if v3 else 1e-6, pos_interp="meta")


TEACHER_FILES = ["teacher_dinov3_hf", "teacher_dinov3_meta", "teacher_dinov2_hf", "teacher_dinov2_meta",
                 "teacher_dinov2_registers_hf", "teacher_dinov2_registers_meta"]


@pytest.mark.parametrize("name", TEACHER_FILES)
def test_teacher_parity(name):
    d, w = parity(name)
    vit = distill.DinoViT(**vit_config(d["config"]))
    distill.load_strict(vit, distill.convert_teacher_state(w, vit), name)
    vit.eval()
    with torch.no_grad():
        for key, x in d["inputs"].items():
            suffix = key.removeprefix("pixel_values")
            assert_close(vit(x), d["outputs"]["last_hidden_state" + suffix])
        assert_close(vit.patch_tokens(d["inputs"]["pixel_values"]), d["outputs"]["patch_tokens"])


def test_teacher_preprocess_parity():
    """Every case x_S of the file. Its uint8_S and processor_S outputs are intermediate steps that
    dino_preprocess does not return (it is one function), so only the teacher input is compared."""
    d = torch.load(os.path.join(PARITY, "teacher_preprocess.pt"), weights_only=True)
    pc = d["config"]["processor_config"]
    assert_supported("DINOv3 image processor", pc, do_resize=True, do_rescale=True, do_normalize=True,
                     rescale_factor=1 / 255, resample=2, do_center_crop=None)  # resample 2: bilinear
    assert pc["size"]["height"] == pc["size"]["width"]
    mean, std = torch.tensor(pc["image_mean"]), torch.tensor(pc["image_std"])
    cases = [k for k in d["inputs"] if k.startswith("x_")]
    assert cases
    for key in cases:
        x = d["inputs"][key]
        assert_close(distill.dino_preprocess(x, x.shape[-1], mean, std, pc["size"]["height"]),
                     d["outputs"]["teacher_input_" + key[2:]])


def stage1_teacher():
    """The DINOv3 teacher held inside the RecTok stage-1 parity model, loaded through the checkpoint-prefix
    path a released stage-1 checkpoint uses."""
    d, w = parity("tokenizer_stage1_forward")
    prefix = f"sem_foundation_models.{d['config']['foundation_model_type']}."
    sd = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
    tc = d["extra_models"]["teacher_config"]
    vit = distill.DinoViT(**vit_config(tc))
    distill.load_strict(vit, distill.convert_teacher_state(sd, vit), "stage-1 teacher")
    grid = d["config"]["img_size"] // d["config"]["patch_size"]  # the tokenizer's grid, which the teacher must give
    # HF DINOv3 rescales its RoPE coordinates in training mode when its config sets pos_embed_rescale
    return d, distill.Teacher(vit, "dino", grid=grid, rope_jitter=tc.get("pos_embed_rescale") is not None)


def test_teacher_targets_in_stage1_forward():
    """Targets as the released stage 1 makes them: jittered RoPE (teacher left in train mode) and plain."""
    d, teacher = stage1_teacher()
    x = d["inputs"]["x"]
    rescale = d["inputs"]["teacher_rope_rescale_log"].exp()
    assert_close(teacher(x, rope_rescale=rescale), d["outputs"]["sem_target"])
    assert_close(teacher.eval()(x), d["outputs"]["sem_target_teacher_eval"])


def test_teacher_rope_jitter_is_drawn_in_train_mode_only():
    _, teacher = stage1_teacher()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    teacher.train()
    assert not teacher.vit.training, "a parent's .train() must not unfreeze the ViT"
    torch.manual_seed(0)
    a, b = teacher(x), teacher(x)
    assert (a - b).abs().max() > 1e-4, "train mode draws a new RoPE rescale per batch"
    teacher.eval()
    torch.testing.assert_close(teacher(x), teacher(x), rtol=0, atol=0)
    teacher.rope_jitter = False
    teacher.train()
    torch.testing.assert_close(teacher(x), teacher.eval()(x), rtol=0, atol=0)


#################################################################################
#                    Teacher: loading official weights                          #
#################################################################################


def official_keys(name):
    with open(os.path.join(HERE, "tests", "official_keys", name)) as f:
        return json.load(f)


def test_official_dinov3_l_keys_load_strictly():
    """The DINOv3-L held in the released stage-1 checkpoint (HF names) maps onto our ViT-L/16 exactly."""
    keys = official_keys("rectok_BB_C128_stage1_dinov3L.json")["model_state_dict"]
    prefix = "sem_foundation_models.dinov3."
    sd = {k[len(prefix):]: torch.empty(s, device="meta") for k, s in keys.items() if k.startswith(prefix)}
    with torch.device("meta"):
        vit = distill.DinoViT(**distill.ARCHS["dinov3_vitl16"])
    ours = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    converted = {k: tuple(v.shape) for k, v in distill.convert_teacher_state(sd, vit).items()}
    assert converted == ours
    assert sum(math.prod(s) for s in ours.values()) == pytest.approx(303.1e6, rel=1e-3)


def test_official_dinov2_layouts_have_meta_shapes():
    with torch.device("meta"):
        vit = distill.DinoViT(**distill.ARCHS["dinov2_vitl14_reg"])
        g = distill.DinoViT(**distill.ARCHS["dinov2_vitg14"])
    assert vit.pos_embed.shape == (1, 1 + 37 * 37, 1024)  # the 518 px native grid of the hub checkpoints
    assert vit.register_tokens.shape == (1, 4, 1024)
    assert g.blocks[0].mlp.w12.weight.shape == (2 * 4096, 1536)  # ViT-g's SwiGLU
    assert distill.default_weights_url("dinov2_vitl14_reg").endswith("dinov2_vitl14_reg4_pretrain.pth")


def write_safetensors(path, tensors):
    """A minimal writer (the format: u64 header size, JSON header, raw little-endian bytes)."""
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for k, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[k] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_safetensors_reader(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "c": torch.randn(2, 2).half(),
               "d": torch.arange(6).reshape(2, 3), "e": torch.zeros(0, 4)}
    write_safetensors(tmp_path / "x.safetensors", tensors)
    back = distill.load_safetensors(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)


def test_build_teacher_from_hf_safetensors(tmp_path, tiny_arch):
    d, w = tiny_arch
    path = str(tmp_path / "model.safetensors")
    write_safetensors(path, w)
    teacher = distill.build_teacher("dinov3_tiny", path, grid=4).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    ref = teacher.vit.patch_tokens(distill.dino_preprocess(x, 64))
    assert_close(teacher(x), ref)
    assert teacher.dim == 64


def test_dinov2_teacher_sees_the_tokenizer_grid(tmp_path, monkeypatch):
    d, w = parity("teacher_dinov2_meta")
    cfg = vit_config(d["config"])
    monkeypatch.setitem(distill.ARCHS, "dinov2_tiny", cfg)
    path = str(tmp_path / "v2.pth")
    torch.save(w, path)
    teacher = distill.build_teacher("dinov2_tiny", path, grid=6)
    with torch.autocast("cpu", torch.bfloat16):
        t = teacher(torch.rand(2, 3, 96, 96) * 2 - 1)
    assert t.shape == (2, 36, 64) and t.dtype == torch.float32 and torch.isfinite(t).all()
    assert not t.requires_grad


def test_build_teacher_rejects_wrong_architecture(tmp_path, tiny_arch):
    d, w = parity("teacher_dinov2_hf")
    path = str(tmp_path / "v2.pth")
    torch.save(w, path)
    with pytest.raises(ValueError, match="missing keys") as e:
        distill.build_teacher("dinov3_tiny", path, grid=4)
    assert "unexpected keys" in str(e.value) and "pos_embed" in str(e.value)


def test_teacher_weights_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="licence"):
        distill.build_teacher("dinov3_vitl16", None)
    with pytest.raises(FileNotFoundError, match="not found"):
        distill.build_teacher("dinov3_vitl16", str(tmp_path / "missing.pth"))
    with pytest.raises(RuntimeError, match="could not download"):  # a closed local port: offline
        distill.resolve_weights("http://127.0.0.1:9/dinov2_vits14_pretrain.pth", "dinov2_vits14")
    with pytest.raises(ValueError, match="unknown teacher"):
        distill.build_teacher("dinov4", None)
    with pytest.raises(FileNotFoundError, match="python distill.py"):
        distill.build_teacher("standin", str(tmp_path / "none.pt"))
    for argv, flag in ((["--weights", str(tmp_path / "dinov3.pth")], "--weights"),  # trained, the weights unread
                       (["check", "dinov3_vitl16", "--epochs", "3"], "--epochs")):  # training flags in check mode
        with pytest.raises(SystemExit):
            distill.parse_args(argv)
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
    args = distill.parse_args(["check", "dinov3_vitl16", "--image-size", "64", "--weights", "w.pth"])
    assert (args.mode, args.arch, args.image_size, args.weights) == ("check", "dinov3_vitl16", 64, "w.pth")


@pytest.mark.parametrize("loader", ["distill.fetch", "fid.FIDInception.load"])
def test_weights_are_downloaded_once_per_machine(tmp_path, inception_files, loader):
    """2 gloo processes that both need a file from a URL (a teacher's or the FID Inception's weights): one
    downloads it, the other waits and reads the same copy (the server answers slowly, so two downloads at
    once would both reach it)."""
    served, requests = tmp_path / "served", []
    served.mkdir()
    shutil.copy(inception_files / "inception.pth", served / "weights.pth")

    class Slow(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            time.sleep(1.0)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/weights.pth"
    call = f"distill.fetch({url!r}, 'offline')" if loader == "distill.fetch" else f"fid.FIDInception().load({url!r})"
    script = tmp_path / "fetch.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import distill, fid\n"
        "dist.init_process_group('gloo')\n"
        f"torch.hub.set_dir({str(tmp_path / 'hub')!r})\n"
        f"result = {call}\n"
        "said = result if isinstance(result, str) else type(result).__name__\n"  # the path, or the model
        f"open({str(tmp_path)!r} + f'/rank{{dist.get_rank()}}.txt', 'w').write(said)\n"
        "dist.destroy_process_group()\n")
    try:
        torchrun(str(script), [])
    finally:
        server.shutdown()
    cached = tmp_path / "hub" / "checkpoints" / "weights.pth"
    assert requests == ["/weights.pth"]
    assert cached.read_bytes() == (served / "weights.pth").read_bytes()
    results = {(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)}  # both ranks got it
    assert results == ({str(cached)} if loader == "distill.fetch" else {"FIDInception"})


#################################################################################
#                        Data (distill.py) and stand-in teacher                 #
#################################################################################


def test_synthetic_data_is_deterministic_and_balanced():
    a = distill.SyntheticShapes(40, 32)
    b = distill.SyntheticShapes(40, 32)
    x, y = a[7]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, b[7][0]) and y == b[7][1]
    assert not torch.equal(a[7][0], distill.SyntheticShapes(40, 32, "val")[7][0])
    assert np.bincount([a[i][1] for i in range(40)]).tolist() == [4] * 10
    assert distill.SyntheticShapes(4, 48)[1][0].shape == (3, 48, 48)
    assert sorted(a.cache) == list(range(40)) and torch.equal(a[7][0], x)  # rendered once, kept
    big = distill.SyntheticShapes(40, 32, cache_bytes=40 * 32 * 32 * 3 - 1)
    assert torch.equal(big[7][0], x) and not big.cache  # over the budget: rendered every time


def test_adm_center_crop():
    wide = np.zeros((400, 600, 3), np.uint8)
    wide[:, 300:] = 255  # left half black, right half white
    out = distill.center_crop_adm(Image.fromarray(wide), 64)
    assert out.shape == (64, 64, 3)
    assert out[:, :30].max() < 10 and out[:, 34:].min() > 245  # the centre column is the edge


def test_sixteen_bit_greyscale_is_scaled(tmp_path):
    """A 16-bit greyscale PNG at mid-grey loads as mid-grey, not clipped to white."""
    (tmp_path / "g").mkdir()
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(tmp_path / "g" / "deep.png")
    with Image.open(tmp_path / "g" / "deep.png") as im:
        assert im.mode.startswith("I")
    x, _ = distill.ImageFolder(str(tmp_path), 32)[0]
    assert x.shape == (3, 32, 32) and abs(x.mean().item()) < 0.01  # 128/255 in [-1, 1]


def test_standin_resume_is_exact(tmp_path):
    """16 steps straight equal 5 steps, a stop, and a resume to 16, bit for bit, whether the images come
    from the main process or from persistent worker processes that keep their renders across epochs."""
    straight, split = str(tmp_path / "a"), str(tmp_path / "b")
    distill.main(STANDIN_TINY + ["--out", straight])
    distill.main(STANDIN_TINY + ["--out", split, "--stop-at", "5", "--workers", "2"])
    assert distill.main(STANDIN_TINY + ["--out", split, "--stop-at", "5"]) is None  # a no-op, says so
    assert not os.path.exists(os.path.join(split, "teacher.pt"))
    distill.main(STANDIN_TINY + ["--out", split, "--workers", "2"])
    a = torch.load(os.path.join(straight, "teacher.pt"), weights_only=True)
    b = torch.load(os.path.join(split, "teacher.pt"), weights_only=True)
    assert a["step"] == b["step"] == 16
    for k in a["ema"]:
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    mtime = os.path.getmtime(os.path.join(straight, "teacher.pt"))
    assert distill.main(STANDIN_TINY + ["--out", straight]) is None  # a finished run re-run: a no-op
    assert os.path.getmtime(os.path.join(straight, "teacher.pt")) == mtime
    teacher = distill.build_teacher("standin", os.path.join(straight, "teacher.pt"), grid=4)
    assert teacher(torch.zeros(3, 3, 32, 32)).shape == (3, 16, 32)


def test_standin_two_process_gloo(tmp_path):
    """2 processes train one teacher, and its held-out accuracy counts each of 63 images once (no rank
    pads its share with repeats): what one process measures with the saved EMA weights."""
    out = str(tmp_path / "ddp")
    run = torchrun("distill.py", [*STANDIN_TINY, "--batch-size", "16", "--num-val", "63", "--out", out])
    ckpt = torch.load(os.path.join(out, "teacher.pt"), weights_only=True)
    assert ckpt["step"] == 16 and 0 <= ckpt["accuracy"] <= 1
    assert "held-out accuracy" in run.stdout and "img/s" in run.stdout
    ema = distill.StandinClassifier(**ckpt["config"])
    ema.load_state_dict(ckpt["ema"])
    val = distill.build_dataset("synthetic", 32, "val", 63)
    loader = torch.utils.data.DataLoader(val, batch_size=16)
    assert distill.evaluate(ema, loader, torch.device("cpu")) == ckpt["accuracy"]


def test_standin_accuracy_is_rank_0s_weights_on_every_image(tmp_path):
    """2 gloo processes whose classifiers differ only in BatchNorm running statistics (as DDP leaves them)
    measure together what rank 0's classifier measures alone on the whole held-out set."""
    script = tmp_path / "accuracy.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import distill\n"
        "dist.init_process_group('gloo')\n"
        "rank, world = dist.get_rank(), dist.get_world_size()\n"
        "torch.manual_seed(0)\n"
        "m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8), torch.nn.BatchNorm1d(8),\n"
        "                        torch.nn.Linear(8, 10))\n"
        "m[2].running_mean += 3.0 * rank  # rank 1's own statistics\n"
        "val = distill.build_dataset('synthetic', 32, 'val', 63)\n"
        "loader = torch.utils.data.DataLoader(distill.shard(val, rank, world), batch_size=16)\n"
        "acc = distill.evaluate(m, loader, torch.device('cpu'))\n"
        f"open({str(tmp_path)!r} + f'/rank{{rank}}.txt', 'w').write(repr(acc))\n"
        "dist.destroy_process_group()\n")
    torchrun(str(script), [])
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8), torch.nn.BatchNorm1d(8),
                            torch.nn.Linear(8, 10))
    val = distill.build_dataset("synthetic", 32, "val", 63)
    alone = distill.evaluate(m, torch.utils.data.DataLoader(val, batch_size=16), torch.device("cpu"))
    assert [float((tmp_path / f"rank{r}.txt").read_text()) for r in (0, 1)] == [alone, alone]


def test_standin_shape_errors(capsys):
    """A stand-in teacher shape the ViT cannot take fails at the command line: each stopped at the first
    step with a tensor-size mismatch."""
    for argv, flag in ((["--patch-size", "6"], "--patch-size 6: "), (["--heads", "3"], "--heads 3: "),
                       (["--heads", "64"], "--heads 64: ")):
        with pytest.raises(SystemExit):
            distill.parse_args(argv)
        assert flag in capsys.readouterr().err, argv
    assert distill.parse_args(["--patch-size", "8", "--heads", "8"]).heads == 8


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        distill.ImageFolder(str(tmp_path / "nope"), 32)
    with pytest.raises(ValueError, match="no class sub-folders"):
        distill.ImageFolder(str(tmp_path), 32)
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match="no images"):
        distill.ImageFolder(str(tmp_path), 32)
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(tmp_path / "cat" / "ok.png")
    (tmp_path / "cat" / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="1 of 2 files .* not readable images .*bad.jpg.*--skip-bad-images"):
        distill.ImageFolder(str(tmp_path), 32)  # found when the folder is listed, not mid-run
    data = distill.ImageFolder(str(tmp_path), 32, skip_bad=True)
    assert len(data) == 1 and data.num_classes == 1
    x, y = data[0]
    assert x.shape == (3, 32, 32) and y == 0
    good = tmp_path / "cat" / "ok.png"
    good.write_bytes(good.read_bytes()[:60])  # the header reads, the pixels do not
    (tmp_path / "cat" / "bad.jpg").unlink()
    with pytest.raises(RuntimeError, match="cannot read image .*ok.png.*--skip-bad-images"):
        distill.ImageFolder(str(tmp_path), 32)[0]
    assert distill.ImageFolder(str(tmp_path), 32, skip_bad=True)[0] is None  # skipped when read, and said


def test_image_folder_check_is_shared_by_the_ranks(tmp_path):
    """Under torchrun each rank reads the headers of its own share of the files (shared storage sees each
    once, not once per rank; ImageNet's 1.28M on 8 ranks) and all ranks end with the same list; a set one
    rank builds alone (`every_rank=False`) is checked whole, with no collective to hang on."""
    for c, names in (("a", ["0.png", "1.png", "bad0.jpg", "2.png"]), ("b", ["3.png", "bad1.jpg", "4.png"])):
        (tmp_path / "data" / c).mkdir(parents=True)
        for name in names:
            path = tmp_path / "data" / c / name
            if name.startswith("bad"):
                path.write_bytes(b"not an image")
            else:
                Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(path)
    script = tmp_path / "check.py"
    script.write_text(f"""import json, os, sys
sys.path.insert(0, {HERE!r})
import torch.distributed as dist
import distill
checked, readable = [], distill.readable
distill.readable = lambda path: checked.append(os.path.basename(path)) or readable(path)
dist.init_process_group("gloo")
shared = distill.ImageFolder(sys.argv[1], 8, skip_bad=True)
record = {{"checked": list(checked), "samples": [os.path.basename(p) for p, _ in shared.samples]}}
if dist.get_rank() == 0:
    record["alone"] = len(distill.ImageFolder(sys.argv[1], 8, skip_bad=True, every_rank=False))
with open(sys.argv[2] + str(dist.get_rank()), "w") as f:
    json.dump(record, f)
dist.destroy_process_group()
""")
    torchrun(str(script), [str(tmp_path / "data"), str(tmp_path / "rank")])
    ranks = [json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1)]
    assert sorted(ranks[0]["checked"] + ranks[1]["checked"]) == sorted(os.listdir(tmp_path / "data" / "a") +
                                                                        os.listdir(tmp_path / "data" / "b"))
    assert ranks[0]["samples"] == ranks[1]["samples"] == ["0.png", "1.png", "2.png", "3.png", "4.png"]
    assert ranks[0]["alone"] == 5


#################################################################################
#                        Tokenizer (tokenizer.py): parity                       #
#################################################################################


def test_encoder_parity(parity_sizes):
    d, w = parity("tokenizer_encoder")
    c, i, o = d["config"], d["inputs"], d["outputs"]
    enc = tokenizer.Encoder(c["model_size"], c["img_size"], c["patch_size"], c["token_channels"])
    enc.load_state_dict(tokenizer.from_official(w))
    assert_close(enc.rope, o["rope_tensor"])
    len_keep = tokenizer.keep_count((c["img_size"] // c["patch_size"]) ** 2, c["mask_ratio"])
    assert len_keep == o["len_keep"]
    ids_keep, ids_restore = tokenizer.mae_ids(i["mask_noise"], len_keep)
    assert torch.equal(ids_keep, o["ids_keep"]) and torch.equal(ids_restore, o["ids_restore"])
    with torch.no_grad():
        assert_close(enc(i["x"], ids_keep), o["masked_moments"])
        assert_close(enc(i["x"]), o["unmasked_moments"])


def test_posterior_and_flow_parity():
    d, _ = parity("tokenizer_posterior_and_flow")
    i, o = d["inputs"], d["outputs"]
    post = tokenizer.Posterior(i["moments"])
    z = post.sample(i["eps_post"])
    assert_close(z, o["z"])
    assert_close(post.kl(), o["kl_per_sample"])
    assert post.kl().sum().item() / len(z) == pytest.approx(float(o["kl_loss"]), rel=1e-5)
    c = d["config"]
    assert c["kl_weight"] * post.kl().sum().item() / len(z) == pytest.approx(float(o["kl_loss_weighted"]), rel=1e-5)
    s = tokenizer.latent_shift(c["img_size"] // c["patch_size"], c["token_channels"])
    assert s == pytest.approx(c["timestep_shift"])
    tau = tokenizer.flow_tau(i["u"] if "u" in i else i["n"], c["noise_schedule"], s)
    assert_close(tau, o["tau"])
    assert_close(tokenizer.forward_flow(z, tau, i["eps_flow"], i.get("gamma", c["gamma"])), o["z_tau"])
    # The named schedules store their shift but not their grid, so the shift is checked, not derived.
    for name, sched in o["schedules"].items():
        for schedule in ("shift", "uniform"):
            assert_close(tokenizer.flow_tau(i["u_vector"], schedule, sched["shift"]), sched["tau_" + schedule])
    assert_close(tokenizer.flow_tau(i["n_vector"], "lognorm", s), o["tau_lognorm"])
    clamp = tokenizer.Posterior(i["moments_clamp"])
    assert_close(clamp.logvar, o["clamp_logvar"])
    assert_close(clamp.std, o["clamp_std"])


def test_pixel_decoder_parity(parity_sizes):
    d, w = parity("tokenizer_pixel_decoder")
    c, i, o = d["config"], d["inputs"], d["outputs"]
    dec = tokenizer.PixelDecoder(c["model_size"], c["img_size"], c["patch_size"], c["token_channels"])
    dec.load_state_dict(tokenizer.from_official(w))
    with torch.no_grad():
        assert_close(dec(i["z_masked"], i["ids_restore"]), o["image_masked"])
        assert_close(dec(i["z_full"]), o["image_full"])


def test_semantic_decoder_parity(parity_sizes):
    d, w = parity("tokenizer_semantic_decoder")
    c, i, o = d["config"], d["inputs"], d["outputs"]
    sem = tokenizer.SemanticDecoder(c["model_size"], c["img_size"], c["patch_size"], c["token_channels"],
                                    c["sem_embed_dim"])
    sem.load_state_dict(tokenizer.from_official(w))
    with torch.no_grad():
        masked = sem(i["z_tau"], i["ids_restore"])
        assert_close(sem(i["z_full"]), o["features_full"])
    assert_close(masked, o["features_masked"])
    kinds = [k.removeprefix("sem_loss_") for k in o if k.startswith("sem_loss_")]
    assert kinds
    for kind in kinds:  # over ALL tokens, masked ones included
        assert tokenizer.semantic_loss(masked, i["target"], kind).item() == pytest.approx(
            float(o[f"sem_loss_{kind}"]), rel=1e-5)


def test_full_reconstruct_parity(parity_sizes):
    d, w = parity("tokenizer_full_reconstruct")
    c, i, o = d["config"], d["inputs"], d["outputs"]
    assert_supported("tokenizer_full_reconstruct", c, foundation_model_type="", cls_token_type="none", disable_kl=False,
                     use_qknorm=False)  # the stage-2 / generator layout: encoder and pixel decoder
    model = tokenizer.RecTok(c["img_size"], c["patch_size"], c["token_channels"], c["vit_enc_model_size"],
                             c["vit_dec_model_size"], sem_decoder="none", mask_ratio=c["mask_ratio"],
                             mask_ratio_min=min(c["mask_ratio_min"], c["mask_ratio"]), gamma=c["gamma"],
                             noise_schedule=c["noise_schedule"]).eval()
    model.load_state_dict(tokenizer.from_official(w))
    # theirs: (z - mean) * scale_factor / std, so our sigma is std / scale_factor
    mu, sigma = i["norm_mean"], i["norm_std"] / c["scale_factor"]
    with torch.no_grad():
        assert_close(model.moments(i["x"]), o["moments"])
        latent = model.tokenize(i["x"], mu, sigma)
        assert_close(latent, o["latent_normalized"])
        assert_close(model.decoder(latent.flatten(2).transpose(1, 2) * sigma + mu), o["decoded_raw"])
        assert_close(model.detokenize(latent, mu, sigma), o["reconstruction"])


def lpips_names(sd, prefix=""):
    """Reference LPIPS names (net.sliceK.N, linK.model.1, scaling_layer.shift/scale) -> ours."""
    out = {}
    for k, v in sd.items():
        if k.startswith(prefix):
            k = k[len(prefix):]
            if k.startswith("net.slice"):
                k = "features." + k.split(".", 2)[2]
            elif k.startswith("lin"):
                k = f"lins.{k[3]}.weight"
            out[k.replace("scaling_layer.", "").replace("shift", "offset")] = v
    return out


def perceptual_weights(model_name):
    """(LPIPS weight, ConvNeXt weight) of the authors' PerceptualLoss name 'lpips-convnext_s-A-B'."""
    parts = model_name.split("-")
    assert parts[:2] == ["lpips", "convnext_s"], f"perceptual loss {model_name!r} is not implemented here"
    return float(parts[2]), float(parts[3])


def perceptual_from_reference(w, prefix="", model_name="lpips-convnext_s-1.0-0.1"):
    pl = tokenizer.PerceptualLoss(*perceptual_weights(model_name))
    sd = {"lpips." + k: v for k, v in lpips_names(w, prefix + "lpips.").items()}
    sd.update({k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix + "convnext.")})
    sd = {("convnext." + k if k.startswith("convnext.") else k): v for k, v in sd.items()}
    sd["convnext.mean"], sd["convnext.std"] = w[prefix + "imagenet_mean"], w[prefix + "imagenet_std"]
    pl.load_state_dict(sd)
    pl.lpips.freeze(), pl.convnext.freeze()
    return pl


def test_lpips_parity():
    d, w = parity("lpips_vgg")
    lp = tokenizer.LPIPS()
    lp.load_state_dict(lpips_names(w))
    lp.freeze()
    with torch.no_grad():
        assert_close(lp(d["inputs"]["img0"] * 2 - 1, d["inputs"]["img1"] * 2 - 1), d["outputs"]["value"])


def test_convnext_perceptual_parity():
    d, w = parity("convnext_perceptual")
    pl = perceptual_from_reference(w, model_name=d["config"]["model_name"])
    a, b = d["inputs"]["inputs"], d["inputs"]["pred"]
    with torch.no_grad():
        logits = pl.convnext(torch.cat([a, b]))
        assert_close(logits[:2], d["outputs"]["logits_img0"])
        assert_close(logits[2:], d["outputs"]["logits_img1"])
        assert_close(pl.lpips(a * 2 - 1, b * 2 - 1), d["outputs"]["lpips"])
        p = pl(a, b)
    assert_close(p, d["outputs"]["perceptual"])
    assert p.mean().item() == pytest.approx(float(d["outputs"]["perceptual_mean"]), rel=1e-4)


def test_patchgan_parity():
    d, w = parity("patchgan")
    disc = tokenizer.PatchGAN(**d["config"])
    disc.load_state_dict(w)
    i, o = d["inputs"], d["outputs"]
    with torch.no_grad():
        disc.eval()
        real, fake = disc(i["real"]), disc(i["fake"])
        assert_close(real, o["eval_logits_real"])
        assert tokenizer.hinge_d_loss(real, fake).item() == pytest.approx(float(o["eval_d_loss"]), rel=1e-5)
        assert -fake.mean().item() == pytest.approx(float(o["eval_g_loss"]), rel=1e-5)
        disc.train()  # the released loss module runs BN on batch statistics
        real, fake = disc(i["real"]), disc(i["fake"])
    assert_close(real, o["train_logits_real"])
    assert_close(fake, o["train_logits_fake"])
    assert tokenizer.hinge_d_loss(real, fake).item() == pytest.approx(float(o["train_d_loss"]), rel=1e-5)
    assert -fake.mean().item() == pytest.approx(float(o["train_g_loss"]), rel=1e-5)


def test_stage1_forward_and_losses_parity(parity_sizes):
    """The whole released stage-1 training pass: masking, posterior, flow, both decoders, the DINOv3
    teacher with its RoPE jitter, and every loss term, weighted as the file's loss module weighs them,
    at each epoch the file holds (the GAN on at 150 and off at 50 in the shipped set)."""
    d, w = parity("tokenizer_stage1_forward")
    c, i, o = d["config"], d["inputs"], d["outputs"]
    assert_supported("tokenizer_stage1_forward", c, encoder_type="default", cls_token_type="none",
                     diff_cls_token=False, sem_input_type="noisy", sem_target="rec+align", disable_kl=False,
                     use_qknorm=False)
    fix = c["mask_ratio_type"] == "fix"  # the ratio itself, not max(0, U(min, ratio))
    model = tokenizer.RecTok(c["img_size"], c["patch_size"], c["token_channels"], c["vit_enc_model_size"],
                             c["vit_dec_model_size"], c["vit_sem_model_size"], sem_decoder=c["sem_dec_type"],
                             teacher_dim=d["extra_models"]["teacher_config"]["hidden_size"],
                             mask_ratio=c["mask_ratio"], mask_ratio_min=c["mask_ratio"] if fix else c["mask_ratio_min"],
                             gamma=c["gamma"], noise_schedule=c["noise_schedule"])
    model.load_state_dict(tokenizer.from_official(w))
    _, teacher = stage1_teacher()
    ratio = c["mask_ratio"] if fix else max(0.0, i["mask_ratio_draw"])
    draw = i["u"] if "u" in i else i.get("n")
    out = model(i["x"], ratio=ratio, mask_noise=i["mask_noise"], eps_post=i["eps_post"], eps_flow=i.get("eps_flow"),
                tau=None if draw is None else tokenizer.flow_tau(draw, c["noise_schedule"], model.s))
    if c["mask_ratio"] != 0:
        assert torch.equal(out["ids_restore"], o["ids_restore"])
        assert out["z"].shape[1] == o["len_keep"] == tokenizer.keep_count(model.grid ** 2, ratio)
    assert_close(out["decoded"], o["decoded"])
    assert_close(out["posterior"].kl(), o["kl_per_sample"])
    rescale = i.get("teacher_rope_rescale_log")
    target = teacher(i["x"], rope_rescale=rescale.exp()) if rescale is not None else teacher.eval()(i["x"])
    assert_close(target, o["sem_target"])
    assert_close(out["sem_pred"], o["sem_pred"])
    lm = d["extra_models"]["loss_module"]
    lc = lm["config"]
    assert_supported("loss_module", lc, reconstruction_loss="l2", logvar_init=0.0)
    lw = reference_weights(lm)
    loss = tokenizer.TokenizerLoss(perceptual_from_reference(lw, "perceptual_loss.", lc["perceptual_loss"]),
                                   recon_weight=lc["reconstruction_weight"], perceptual_weight=lc["perceptual_weight"],
                                   kl_weight=lc["kl_weight"], sem_weight=lc["sem_weight"], sem_loss=lc["sem_loss_type"],
                                   gan_weight=lc["discriminator_weight"],
                                   gan_start_epoch=lc["discriminator_start_epoch"])
    loss.discriminator.load_state_dict({k[len("discriminator."):]: v for k, v in lw.items()
                                        if k.startswith("discriminator.")})
    # their logged terms are weighted; ours are not
    names = {"rec": ("reconstruction_loss", lc["reconstruction_weight"]),
             "perceptual": ("perceptual_loss", lc["perceptual_weight"]), "kl": ("kl_loss", lc["kl_weight"]),
             "sem": ("sem_loss", lc["sem_weight"]), "gan": ("gan_loss", 1.0)}
    epochs = {key: int(key.rpartition("epoch")[2]) for key in o["loss"]}
    assert any(key.startswith("generator") for key in epochs)
    for key, epoch in epochs.items():
        ref = o["loss"][key]
        if key.startswith("discriminator"):
            on = epoch >= loss.gan_start_epoch  # their discriminator loss is gated by the epoch alone
            d_loss = loss.discriminator_loss(i["x"], out["decoded"], epoch).item() if on else 0.0
            assert d_loss == pytest.approx(ref["discriminator_loss"].item(), rel=1e-5, abs=1e-8), key
            continue
        total, terms = loss.generator_loss(i["x"], out, target, epoch)
        assert total.item() == pytest.approx(ref["total_loss"].item(), rel=1e-5), key
        assert ("gan" in terms) == loss.gan_on(epoch) == bool(ref["discriminator_factor"] * ref["d_weight"]), key
        for term, (name, weight) in names.items():
            ours = weight * terms[term].item() if term in terms else 0.0
            assert ours == pytest.approx(ref[name].item(), rel=1e-4, abs=1e-8), (key, term)
        assert -10 * math.log10(names["rec"][1] * terms["rec"].item()) == pytest.approx(ref["psnr"].item(), rel=1e-5)


def test_official_tokenizer_keys_load_strictly():
    """The released RecTok (stage-1 with the DINOv3-L teacher, and the stage-2 layout) maps onto ours."""
    for name, sem in (("rectok_BB_C128_stage1_dinov3L.json", "transformer"),
                      ("rectok_BB_C128_stage2.json", "none")):
        keys = official_keys(name)["model_state_dict"]
        with torch.device("meta"):
            model = tokenizer.RecTok(256, 16, 128, "base", "base", "tiny", sem_decoder=sem, teacher_dim=1024)
        sd = tokenizer.from_official({k: torch.empty(s, device="meta") for k, s in keys.items()})
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in sd.items()} == ours, name
    assert sum(math.prod(s) for k, s in ours.items()) == pytest.approx(171.97e6, rel=1e-4)


def test_draw_tau_schedules():
    """shift: tau = shift(U), mean pushed toward noise for s > 1; uniform: U(0,1); lognorm: sigmoid(N)."""
    torch.manual_seed(0)
    means = {}
    for sched in ("shift", "uniform", "lognorm"):
        m = tokenizer.RecTok(64, 16, 128, "tiny", "tiny", sem_decoder="none", noise_schedule=sched)
        tau = m.draw_tau(20000, "cpu")
        assert tau.shape == (20000, 1, 1) and tau.min() >= 0 and tau.max() <= 1
        means[sched] = tau.mean().item()
    assert means["uniform"] == pytest.approx(0.5, abs=0.01)
    assert means["lognorm"] == pytest.approx(0.5, abs=0.01)
    # a 4 x 4 grid with C = 128 has s = sqrt(16 * 128 / 4096) < 1, which pulls tau toward the clean end
    assert tokenizer.latent_shift(4, 128) == pytest.approx(0.7071, rel=1e-4)
    assert means["shift"] < 0.45
    assert tokenizer.shift(torch.tensor(0.5), 4.0).item() == pytest.approx(0.8)  # s > 1: toward noise


def test_mask_ratio_distribution():
    """r = max(0, U(-0.1, 0.4)): 20% of batches unmasked, mean ratio 0.16 (`models/rectok.py`)."""
    m = tokenizer.RecTok(64, 16, 8, "tiny", "tiny", sem_decoder="none")
    random.seed(0)
    r = np.array([m.draw_mask_ratio() for _ in range(40000)])
    assert (r == 0).mean() == pytest.approx(0.2, abs=0.01)
    assert r.mean() == pytest.approx(0.16, abs=0.005)
    assert r.max() <= 0.4


def test_perceptual_gradient_matches_one_batched_pass():
    """The perceptual loss runs the target and the reconstruction as separate passes (so autograd never
    differentiates the target); its gradient must equal that of one pass over the concatenated batch."""
    d, w = parity("convnext_perceptual")
    pl = perceptual_from_reference(w, model_name=d["config"]["model_name"])
    target = d["inputs"]["inputs"]
    pred = d["inputs"]["pred"].clone().requires_grad_(True)
    pl(target, pred).mean().backward()
    ref_pred = d["inputs"]["pred"].clone().requires_grad_(True)
    both = torch.cat([target, ref_pred])
    lp = sum(lin((f[:2] - f[2:]) ** 2).mean(dim=(2, 3), keepdim=True)
             for lin, f in zip(pl.lpips.lins, pl.lpips.taps(both * 2 - 1)))
    logits = pl.convnext(both)
    a, b = pl.lpips_weight, pl.convnext_weight
    ((a * lp + b * torch.nn.functional.mse_loss(logits[:2], logits[2:])) / (a + b)).mean().backward()
    scale = ref_pred.grad.abs().max()
    assert scale > 0
    torch.testing.assert_close(pred.grad, ref_pred.grad, rtol=1e-4, atol=1e-5 * scale)


#################################################################################
#                     Tokenizer: training, resume, DDP, errors                  #
#################################################################################


def test_load_released_tokenizer_layout(parity_sizes, tmp_path):
    """An authors'-layout checkpoint ({'model_ema': ...} with their names) loads strictly, with its config
    read off the weights, and reconstructs as theirs."""
    d, w = parity("tokenizer_full_reconstruct")
    path = str(tmp_path / "RecTok_decft.pth")
    torch.save({"model": w, "model_ema": w}, path)
    model = tokenizer.load_tokenizer(path)
    config = model.config
    assert config["channels"] == 8 and config["img_size"] == 32 and config["sem_decoder"] == "none"
    i = d["inputs"]
    latent = model.tokenize(i["x"], i["norm_mean"], i["norm_std"])
    with torch.no_grad():
        assert_close(model.detokenize(latent, i["norm_mean"], i["norm_std"]), d["outputs"]["reconstruction"])


def test_tokenizer_api_takes_images_and_returns_the_decoders_latent(stage1_run):
    """tok.encode takes uint8 or [-1, 1] images at the trained size and returns the posterior mean as
    (B, C, h, w); decode gives [0, 1] images and decode(encode(x)) is the evaluation path's reconstruction;
    sample=True draws from the posterior, reproducibly with a generator; another size is refused by name."""
    tok = tokenizer.load_tokenizer(stage1_run)
    assert not tok.training and tok.config["img_size"] == tok.img_size == 32
    data = distill.build_dataset("synthetic", 32, "val", 4)
    x = torch.stack([data[i][0] for i in range(4)])
    as_uint8 = ((x + 1) * 127.5).round().to(torch.uint8)
    with torch.no_grad():
        z = tok.encode(x)
        mean = tokenizer.Posterior(tok.moments(x)).mean
        assert z.shape == (4, 8, 4, 4) and torch.equal(z.flatten(2).transpose(1, 2), mean)
        assert_close(tok.encode(as_uint8), z)
        images = tok.decode(z)
        assert images.shape == (4, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
        assert torch.equal(images, tok.reconstruct(x))
        draws = [tok.encode(x, sample=True, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert not torch.equal(draws[0], z)
    with pytest.raises(ValueError, match=r"reads \(B, 3, 32, 32\).*center-crop"):
        tok.encode(torch.zeros(1, 3, 48, 48, dtype=torch.uint8))


def test_readme_python_block_runs(stage1_run, dit_run, tmp_path, monkeypatch):
    """The README's Python block, as written, on tiny checkpoints in the runs/ folders it names: a photo
    of another size goes through the tokenizer and back, and the generator makes images for 4 labels."""
    block = re.search(r"## From Python.*?```python\n(.*?)```", open(os.path.join(HERE, "README.md")).read(),
                      re.S).group(1)
    for name, path in (("tokenizer_ft", stage1_run), ("dit", dit_run)):
        os.makedirs(tmp_path / "runs" / name)
        os.symlink(path, tmp_path / "runs" / name / "latest.pt")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(
        tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["z"].shape == (1, 8, 4, 4) and scope["recon"].shape == (1, 3, 32, 32)
    assert scope["images"].shape == (4, 3, 32, 32) and 0 <= scope["images"].min() <= scope["images"].max() <= 1


def test_ranks_agree_check_and_broadcast(tmp_path):
    """A module built from each rank's own seed differs across ranks: the checkpoint check refuses it, and
    broadcasting rank 0's weights makes the ranks agree. A rank with no share of an evaluation (more
    processes than images) gathers an empty list of features: it used to stop on torch.cat([]). A nan weight
    on one rank stops both."""
    script = tmp_path / "agree.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import distill\n"
        "dist.init_process_group('gloo')\n"
        "torch.manual_seed(dist.get_rank())\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))\n"
        f"out = open({str(tmp_path)!r} + f'/rank{{dist.get_rank()}}.txt', 'w')\n"
        "try:\n"
        "    distill.check_weights({'net': m}, 0)\n"
        "    out.write('not caught\\n')\n"
        "except RuntimeError as e:\n"
        "    out.write(f'caught: {e}\\n')\n"
        "distill.broadcast_module(m)\n"
        "distill.check_weights({'net': m}, 0)\n"
        "out.write('agree after broadcast\\n')\n"
        "rows = distill.gather([] if dist.get_rank() == 0 else [torch.arange(3.0), torch.arange(3.0, 5.0)])\n"
        "out.write(f'gathered {rows.tolist()}\\n')\n"
        "if dist.get_rank() == 1:\n"
        "    m[0].weight.data[0, 0] = float('nan')\n"
        "try:\n"
        "    distill.check_weights({'net': m}, 5)\n"
        "    out.write('not caught\\n')\n"
        "except FloatingPointError as e:\n"
        "    out.write(f'caught: {e}\\n')\n"
        "dist.destroy_process_group()\n")
    torchrun(str(script), [])
    for rank in (0, 1):  # every rank stops, none is left waiting
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert lines[0].startswith("caught: the ranks hold different net weights"), lines
        assert lines[1] == "agree after broadcast"
        assert lines[2] == "gathered [0.0, 1.0, 2.0, 3.0, 4.0]"
        assert lines[3].startswith("caught: the net weights became nan or inf at or before step 5"), lines


def test_discriminator_step_reads_every_micro_batch_and_is_clipped(tmp_path):
    """The authors' order: D's hinge loss on every micro-batch, gradients averaged, clipped at --clip like
    the generator's, one step."""
    args = tokenizer.parse_args(tok_args("unused.pt", str(tmp_path), "--gan-start-epoch", "0", "--clip", "0.01"))
    loss = tokenizer.build_loss(args, 1, "cpu")
    d_opt = torch.optim.AdamW(loss.discriminator.parameters(), lr=1e-4)
    calls, seen = [], {}
    loss_fn = loss.discriminator_loss
    loss.discriminator_loss = lambda x, fake, epoch: calls.append((x, fake)) or loss_fn(x, fake, epoch)
    before = {k: v.clone() for k, v in loss.discriminator.state_dict().items()}
    step = d_opt.step
    grads = lambda: [p.grad.clone() for p in loss.discriminator.parameters()]  # noqa: E731
    d_opt.step = lambda: seen.update(grads=grads()) or step()
    torch.manual_seed(0)
    batches = [torch.rand(4, 3, 32, 32) * 2 - 1 for _ in range(2)]
    decoded = [torch.rand(4, 3, 32, 32) * 2 - 1 for _ in range(2)]  # the generator's reconstructions
    tokenizer.discriminator_step(loss, d_opt, batches, decoded, 0, args.clip)
    assert len(calls) == 2 and all(torch.equal(x, b) for (x, _), b in zip(calls, batches))
    ref = tokenizer.PatchGAN()
    ref.load_state_dict(before)
    ref_loss = sum(tokenizer.hinge_d_loss(ref(x * 0.5 + 0.5), ref(f * 0.5 + 0.5)) for x, f in calls) / 2
    ref_loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
    assert norm > 0.01  # the clip is active
    for got, want in zip(seen["grads"], (p.grad for p in ref.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)
    assert torch.stack([g.norm() for g in seen["grads"]]).norm() == pytest.approx(0.01, rel=1e-3)


def test_weight_decay_skips_embeddings_and_tokens():
    """The authors' groups: no decay for 1-D tensors or any name containing embed or token."""
    model = tokenizer.RecTok(32, 8, 8, "micro", "micro", sem_size="micro", teacher_dim=16)
    decay, no_decay = distill.weight_decay_groups(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    for name in ("encoder.patch_embed.weight", "decoder.decoder_embed.weight", "sem_decoder.token_embedding.weight",
                 "encoder.positional_embedding", "decoder.mask_token", "sem_decoder.mask_embedding"):
        assert name in skipped, name
    decayed = [names[id(p)] for p in decay["params"]]
    assert decayed and all(p.ndim >= 2 for p in decay["params"])
    assert not [n for n in decayed if "embed" in n or "token" in n]
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0


def test_gamma_zero_turns_the_flow_off():
    """--gamma 0: both decoders read the posterior sample z itself, not a randomly shrunk (1 - tau) z."""
    model = tokenizer.RecTok(32, 8, 8, "micro", "micro", sem_size="micro", teacher_dim=16, gamma=0.0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    eps = torch.randn(3, 16, 8)
    with torch.no_grad():
        out = model(x, ratio=0.0, eps_post=eps)
        assert torch.equal(out["z_tau"], out["z"])
        assert torch.equal(out["decoded"], model.decoder(out["z"], out["ids_restore"]))
        flow = tokenizer.RecTok(32, 8, 8, "micro", "micro", sem_size="micro", teacher_dim=16)
        flow.load_state_dict(model.state_dict())
        noisy = flow(x, ratio=0.0, eps_post=eps, tau=torch.full((3, 1, 1), 0.5))
    assert not torch.equal(noisy["z_tau"], noisy["z"])


def test_mlp_semantic_decoder_is_the_authors():
    """--sem-decoder mlp is `models/rectok.py` MLPDecoder: Linear(C, 4C) -> GELU -> Linear(4C, D) on each
    token, under their key names (a released checkpoint's sem_decoders.<teacher>.mlp.* loads), default init,
    no mask embedding; with masking on it is refused, since it predicts no masked token."""
    C, D = 8, 48
    model = tokenizer.RecTok(32, 8, C, "micro", "micro", sem_decoder="mlp", teacher_dim=D, mask_ratio=0)
    sem = {k: tuple(v.shape) for k, v in model.sem_decoder.state_dict().items()}
    assert sem == {"mlp.0.weight": (4 * C, C), "mlp.0.bias": (4 * C,), "mlp.2.weight": (D, 4 * C), "mlp.2.bias": (D,)}
    assert [type(m) for m in model.sem_decoder.mlp] == [torch.nn.Linear, torch.nn.GELU, torch.nn.Linear]
    released = {(k.replace("sem_decoder.", "sem_decoders.dinov3.", 1)): v for k, v in model.state_dict().items()}
    config = tokenizer.official_config(tokenizer.from_official(released))
    assert (config["sem_decoder"], config["teacher_dim"], config["mask_ratio"]) == ("mlp", D, 0.0)
    z = torch.randn(2, 16, C)
    with torch.no_grad():
        moved = z.clone()
        moved[:, 3] += 1
        a, b = model.sem_decoder(z), model.sem_decoder(moved)
    assert torch.equal(a[:, :3], b[:, :3]) and torch.equal(a[:, 4:], b[:, 4:]) and not torch.equal(a[:, 3], b[:, 3])
    with pytest.raises(ValueError, match="--mask-ratio 0"):
        tokenizer.RecTok(32, 8, C, "micro", "micro", sem_decoder="mlp", teacher_dim=D)
    out = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert out["sem_pred"].shape == (2, 16, D)


PRESET_STAGES = [(distill, distill.PRESETS, []), (tokenizer, tokenizer.PRESETS, []),
                 (dit, dit.PRESETS, ["--latents", "x"]), (probe, probe.PRESETS, []), (sample, sample.PRESETS, [])]


@pytest.mark.parametrize("module,presets,extra", PRESET_STAGES, ids=lambda v: getattr(v, "__name__", ""))
def test_presets_are_the_parser_defaults(module, presets, extra, capsys):
    """Every preset value is in force unless a flag overrides it, and --help prints it."""
    for name, values in presets.items():
        args = module.parse_args(["--preset", name, *extra])
        for k, v in values.items():
            if k != "latents" or not extra:
                assert getattr(args, k) == v, (module.__name__, name, k)
        k, v = next((k, v) for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool))
        flag = ["--" + k.replace("_", "-"), str(2 * v)]  # twice: an image size stays a multiple of the patch
        assert getattr(module.parse_args(["--preset", name, *extra, *flag]), k) == 2 * v
        with pytest.raises(SystemExit):
            module.parse_args(["--preset", name, *extra, "--help"])
        assert f"(default: {v})" in " ".join(capsys.readouterr().out.split())  # however argparse wraps it


def test_every_stage_calls_its_batch_per_process_batch_size(capsys):
    """One vocabulary: every stage's batch flag is --batch-size, per process. sample.py's is too: each rank
    generates whole batches of it (the images do not depend on the process count); it was called
    --global-batch-size and said "over all ranks", so 8 GPUs at 400 each ran 400, not 50."""
    for module, _, extra in PRESET_STAGES:
        with pytest.raises(SystemExit):
            module.parse_args([*extra, "--help"])
        help_text = capsys.readouterr().out
        assert "--batch-size" in help_text and "global-batch" not in help_text, module.__name__
    assert sample.my_batches(14, 4, 1, 2) == [range(8, 12), range(12, 14)]  # rank 1 of 2: whole batches


def test_each_stage_reads_the_default_output_of_the_stage_before(monkeypatch):
    """The pipeline's run folders have one home, distill.RUNS: each stage's default input is the default
    output of the stage before it, and moving a folder there moves both ends (a literal "runs/..." in a
    parser would not follow)."""
    tiny = tokenizer.parse_args([])
    assert tiny.teacher_weights == probe.parse_args(["judge"]).judge == distill.STANDIN_TEACHER
    assert probe.parse_args(["judge"]).samples == os.path.join(sample.parse_args([]).out, "samples.npz")
    assert os.path.dirname(distill.STANDIN_TEACHER) == distill.parse_args([]).out
    assert dit.parse_args([]).latents == tokenizer.parse_args(["encode"]).out
    for key in distill.RUNS:
        monkeypatch.setitem(distill.RUNS, key, os.path.join("elsewhere", key))
    stages = {"teacher": distill.parse_args([]), "tokenizer": tokenizer.parse_args([]),
              "tokenizer_ft": tokenizer.parse_args(["finetune"]), "latents": tokenizer.parse_args(["encode"]),
              "dit": dit.parse_args(["--latents", "x"]), "samples": sample.parse_args([]),
              "probe": probe.parse_args([])}
    assert {key: args.out for key, args in stages.items()} == {key: os.path.join("elsewhere", key) for key in stages}
    latest = {key: os.path.join("elsewhere", key, "latest.pt") for key in stages}
    assert stages["tokenizer_ft"].init == latest["tokenizer"]
    assert stages["latents"].ckpt == tokenizer.parse_args(["evaluate"]).ckpt == latest["tokenizer_ft"]
    assert stages["probe"].tokenizer == latest["tokenizer_ft"] and stages["samples"].dit == latest["dit"]
    args = tokenizer.parse_args(["evaluate"])
    assert os.path.dirname(tokenizer.default_ref_stats(args, 32, 10)) == os.path.join("elsewhere", "fid_stats")


def test_counts_and_sizes_must_be_at_least_one(capsys):
    """A 0 where a count or size is meant is refused at the command line in every stage: --grad-accum 0
    divided by zero in the run skeleton, --log-every 0 in encode and sample.py too, a --batch-size 0 stopped
    in the data loader, and --epochs 0 wrote an untrained stand-in teacher.pt. So is a fraction (an EMA
    decay, the warm-up, the label dropout) outside [0, 1]."""
    cases = [(distill, ["--batch-size", "0"]), (distill, ["--epochs", "0"]), (tokenizer, ["--grad-accum", "0"]),
             (tokenizer, ["encode", "--log-every", "0"]), (tokenizer, ["evaluate", "--num-eval", "0"]),
             (dit, ["--latents", "x", "--batch-size", "0"]), (probe, ["--probe-batch-size", "0"]),
             (sample, ["--log-every", "0"])]
    for module, argv in cases:
        with pytest.raises(SystemExit):
            module.parse_args(argv)
        assert "must be at least 1" in capsys.readouterr().err, (module.__name__, argv)
    fractions = [(tokenizer, ["--ema", "1.5"]), (tokenizer, ["finetune", "--warmup", "-0.1"]),
                 (dit, ["--latents", "x", "--ema", "1.01"]), (dit, ["--latents", "x", "--label-dropout", "2"])]
    for module, argv in fractions:  # an EMA decay of 1.5 trained, its EMA running away from the model
        with pytest.raises(SystemExit):
            module.parse_args(argv)
        assert "must be in [0, 1]" in capsys.readouterr().err, (module.__name__, argv)


def help_entry(text, flag):
    """The lines --help prints for one flag (its own line and the deeper-indented ones under it), joined."""
    lines, entry = text.splitlines(), []
    for line in lines:
        if entry and (line[:3].strip() or not line.strip()):  # the next flag, group or blank line
            break
        if entry or line.startswith(f"  {flag} ") or line == f"  {flag}":
            entry.append(line.strip())
    return " ".join(entry)


def test_flags_that_act_only_with_another_are_refused_without_it(capsys):
    """A flag that shapes a step the run does not take fails at the command line, naming the flag that
    turns that step on (and passes with it), and --help says so beside the flag: sample.py's FID flags without
    --ref-stats and its guidance flags at --cfg 1, evaluate's rFID flags without --rfid, the settings of a
    loss weighted 0, of the flow at --gamma 0, of masking at --mask-ratio 0, of the teacher without a
    semantic decoder, the benchmark switches without --bench and dit.py's preview tokenizer at
    --preview-every 0 were accepted and ignored."""
    ref, rfid = ["--ref-stats", "r.npz"], ["--rfid"]
    perceptual = ["--perceptual-weight", "1"]
    cases = [(sample, ["--fid-mode", "pytorch-fid"], ref), (sample, ["--fid-batch-size", "7"], ref),
             (sample, ["--inception-weights", "w.pth"], ref), (sample, ["--guide", "g.pt"], ["--cfg", "1.3"]),
             (sample, ["--cfg-interval", "0", "0.7"], ["--cfg", "1.3"]),
             (tokenizer, ["--random-weights"], ["--bench", "2"]),
             (dit, ["--random-latents"], ["--bench", "2"]),
             (probe, ["--tau", "0.3"], ["--feature", "flow"]), (probe, ["--protocol", "research", "--augment"],
                                                                 ["--protocol", "mae"]),
             (tokenizer, ["evaluate", "--ref-stats", "r.npz"], rfid),
             (tokenizer, ["evaluate", "--inception-weights", "w.pth"], rfid),
             (tokenizer, ["--vgg16-weights", "v.pth"], perceptual),
             (tokenizer, ["finetune", "--perceptual-weight", "0", "--lpips-weights", "l.pth"], perceptual),
             (tokenizer, ["--gan-weight", "0", "--gan-start-epoch", "0"], ["--gan-weight", "0.1"]),
             (tokenizer, ["--sem-decoder", "none", "--teacher", "dinov3_vitl16"], ["--sem-decoder", "transformer"]),
             (tokenizer, ["--sem-decoder", "mlp", "--mask-ratio", "0", "--sem-size", "tiny"],
              ["--sem-decoder", "transformer"]),
             (tokenizer, ["--gamma", "0", "--noise-schedule", "lognorm"], ["--gamma", "1"]),
             (tokenizer, ["--mask-ratio", "0", "--mask-ratio-min", "-0.2"], ["--mask-ratio", "0.4"]),
             (dit, ["--latents", "c", "--preview-every", "0", "--tokenizer", "t.pt"], ["--preview-every", "5"])]
    for module, argv, turn_on in cases:
        flag = [a for a in argv if a.startswith("--")][-1]
        with pytest.raises(SystemExit):
            module.parse_args(argv)
        err = capsys.readouterr().err
        assert f"{flag}: only with {turn_on[0]}" in err, (module.__name__, argv, err)
        module.parse_args([*argv, *turn_on])
        mode = [argv[0]] if module is tokenizer and argv[0] in tokenizer.MODES else []
        with pytest.raises(SystemExit):
            module.parse_args([*mode, "--latents", "x", "-h"] if module is dit else [*mode, "-h"])
        assert f"(only with {turn_on[0]}" in help_entry(capsys.readouterr().out, flag), (module.__name__, flag)


def test_numbers_that_make_no_sense_are_refused_at_the_command_line(capsys):
    """--clip -1 made the loss climb, --lr 0 trained nothing, a negative loss weight, gamma or weight decay
    trained the wrong way, --stop-at -1 and nan were taken: each flag's type (distill.bounded) refuses them,
    naming the flag, and --help states the bound beside it."""
    cases = [(tokenizer, "--clip", "0"), (tokenizer, "--clip", "-1"), (tokenizer, "--base-lr", "0"),
             (tokenizer, "--kl-weight", "-1e-6"), (tokenizer, "--gamma", "-1"), (tokenizer, "--weight-decay", "-0.1"),
             (tokenizer, "--stop-at", "-1"), (dit, "--lr", "0"), (dit, "--clip", "nan"), (dit, "--final-lr", "inf"),
             (distill, "--lr", "-1"), (probe, "--adam-base-lr", "0"), (probe, "--weight-decay", "-1"),
             (sample, "--cfg", "nan")]  # a nan guidance scale was blamed on the generator
    for module, flag, value in cases:
        with pytest.raises(SystemExit):
            module.parse_args([f"{flag}={value}"] + (["--latents", "x"] if module is dit else []))
        assert f"argument {flag}: {value}: must be " in capsys.readouterr().err, (module.__name__, flag, value)
    with pytest.raises(SystemExit):
        tokenizer.parse_args(["-h"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "tokenizer and discriminator (must be above 0) (default: 3.0)" in shown
    assert "--kl-weight KL_WEIGHT (must be at least 0) (default: 1e-06)" in shown


def test_help_prints_each_docstring_line_as_written():
    """--help prints the stage's docstring, with its Run: lines: a shell continuation written with one
    backslash (not two) joins two command lines into one there (sample.py's did)."""
    for module in (distill, tokenizer, dit, sample, fid, probe):
        with open(module.__file__) as f:
            source = f.read()
        start = source.index('"""') + 3
        written = source[start:source.index('"""', start)]
        assert len(module.__doc__.splitlines()) == len(written.splitlines()), module.__name__


def test_paper_presets_decode_images_with_enough_workers():
    """The paper presets of every stage that decodes ImageNet JPEGs run distill.IMAGE_WORKERS loader
    workers per process: 2, the tiny presets' number, would hold a GPU near 370 img/s (README)."""
    parsed = [distill.parse_args(["--preset", "paper"]), probe.parse_args(["--preset", "paper"])]
    parsed += [tokenizer.parse_args([mode, "--preset", "paper", "--data", "D"]) for mode in tokenizer.MODES]
    assert [args.workers for args in parsed] == [distill.IMAGE_WORKERS] * 7 and distill.IMAGE_WORKERS >= 8
    assert tokenizer.parse_args([]).workers == 2  # the tiny preset keeps the default


def test_finetune_preset_is_the_released_stage2_recipe(capsys):
    args = tokenizer.parse_args(["finetune", "--preset", "paper"])
    assert (args.warmup, args.base_lr, args.epochs, args.gan_start_epoch) == (0.05, 5e-5, 100, 0)
    assert tokenizer.parse_args(["--preset", "paper"]).warmup == 0.25  # stage 1
    assert tokenizer.parse_args(["finetune", "--preset", "paper", "--warmup", "0.1"]).warmup == 0.1
    with pytest.raises(SystemExit):
        tokenizer.parse_args(["finetune", "--preset", "paper", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "fraction of training (must be in [0, 1]) (default: 0.05)" in help_text
    assert "(default: 5e-05)" in help_text


def test_tokenizer_resume_is_exact(standin_teacher, tmp_path, monkeypatch, capsys):
    """k steps, stop, resume to n equals n straight steps, bit for bit (GAN on from step 0); each
    reconstruction grid is written once, at --grid-every steps and where a run stops, and none at
    --grid-every 0 (one was written where each run stopped). A finished run started again says it has
    no step to take (it said it wrote latest.pt)."""
    written, save = [], tokenizer.save_reconstructions
    monkeypatch.setattr(tokenizer, "save_reconstructions",
                        lambda *a: written.append(os.path.basename(a[-1])) or save(*a))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    extra = ["--gan-start-epoch", "0", "--grad-accum", "2"]
    tokenizer.main(tok_args(standin_teacher, a, *extra, "--grid-every", "3"))
    tokenizer.main(tok_args(standin_teacher, b, *extra, "--stop-at", "2"))  # --grid-every 0
    assert torch.load(os.path.join(b, "latest.pt"), weights_only=True)["step"] == 2
    tokenizer.main(tok_args(standin_teacher, b, *extra, "--grid-every", "3"))
    ca = torch.load(os.path.join(a, "latest.pt"), weights_only=True)
    cb = torch.load(os.path.join(b, "latest.pt"), weights_only=True)
    assert ca["step"] == cb["step"] == 4
    for part in ("model", "ema", "discriminator"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    assert os.path.isfile(os.path.join(a, "recon_0000004.png"))
    assert written == ["recon_0000003.png", "recon_0000004.png"] * 2  # run a, then run b's second half
    capsys.readouterr()
    tokenizer.main(tok_args(standin_teacher, a, *extra, "--grid-every", "3"))
    out = capsys.readouterr().out
    assert "at step 4: the run stops there, no step to take" in out and "wrote" not in out
    assert written == ["recon_0000003.png", "recon_0000004.png"] * 2


def test_tokenizer_two_processes_resume_exactly(standin_teacher, tmp_path):
    """Stage 1 on 2 gloo processes with the GAN on from step 0 and 2 micro-batches: the ranks hold the same
    tokenizer and discriminator (every checkpoint checks it, or the run stops), and a stop at step 2 plus a
    resume ends bit-identical to the uninterrupted 2-process run, discriminator included; the stopped and
    resumed run recomputes its blocks in backward (--grad-checkpoint), which changes no bit."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    extra = ["--batch-size", "4", "--grad-accum", "2", "--gan-start-epoch", "0"]
    run = torchrun("tokenizer.py", tok_args(standin_teacher, a, *extra))
    torchrun("tokenizer.py", tok_args(standin_teacher, b, *extra, "--stop-at", "2", "--grad-checkpoint"))
    torchrun("tokenizer.py", tok_args(standin_teacher, b, *extra, "--grad-checkpoint"))
    ckpt = assert_same_runs(a, b, ("model", "ema", "discriminator"))
    assert ckpt["step"] == 8 and len(ckpt["rng"]) == 2
    assert "img/s" in run.stdout and "disc" in run.stdout
    model = tokenizer.load_tokenizer(os.path.join(a, "latest.pt"))
    assert model.config["channels"] == 8 and model.reconstruct(torch.zeros(2, 3, 32, 32)).shape == (2, 3, 32, 32)


def test_tokenizer_without_masking_on_two_processes(standin_teacher, tmp_path):
    """--mask-ratio 0: the mask token and mask embedding are never read, so they are frozen (DDP would
    otherwise stop at step 2 waiting for their gradients)."""
    out = str(tmp_path / "nomask")
    torchrun("tokenizer.py", tok_args(standin_teacher, out, "--batch-size", "8", "--mask-ratio", "0"))
    ckpt = torch.load(os.path.join(out, "latest.pt"), weights_only=True)
    assert ckpt["step"] == 8
    model = tokenizer.RecTok(**ckpt["config"])
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["decoder.mask_token", "sem_decoder.mask_embedding"]
    mask = ckpt["model"]["sem_decoder.mask_embedding"]
    assert torch.equal(mask, torch.zeros_like(mask))  # zero-init, never trained


def test_same_tokenizer_whether_or_not_the_teacher_existed(tmp_path, monkeypatch):
    """`python tokenizer.py` trains a missing stand-in teacher first without touching the tokenizer's
    random streams: the same command gives the same tokenizer in a fresh folder and in one that has the
    teacher. With --sem-decoder none it trains no teacher at all."""
    monkeypatch.setitem(distill.PRESETS, "tiny", dict(distill.PRESETS["tiny"], patch_size=8, width=32, depth=1,
                                                      heads=2, epochs=1, num_train=64, num_val=32,
                                                      batch_size=32))
    flags = tok_args("runs/teacher/teacher.pt", "runs/tokenizer", "--stop-at", "3")
    fresh, ready, nosem = (tmp_path / d for d in ("fresh", "ready", "nosem"))
    monkeypatch.chdir(fresh.mkdir() or fresh)
    tokenizer.main(flags)
    (ready / "runs" / "teacher").mkdir(parents=True)
    shutil.copy(fresh / "runs" / "teacher" / "teacher.pt", ready / "runs" / "teacher" / "teacher.pt")
    monkeypatch.chdir(ready)
    tokenizer.main(flags)
    assert_same_runs(str(fresh / "runs" / "tokenizer"), str(ready / "runs" / "tokenizer"), ("model", "ema"))
    monkeypatch.chdir(nosem.mkdir() or nosem)
    tokenizer.main(tok_args(None, "runs/tokenizer", "--stop-at", "3"))
    assert (nosem / "runs" / "tokenizer" / "latest.pt").is_file() and not (nosem / "runs" / "teacher").exists()


def test_checkpoints_at_every_epoch_end(standin_teacher, cache, tmp_path, monkeypatch):
    """A default run that is killed loses at most an epoch: latest.pt is written at each epoch's end even
    when --ckpt-every is longer than the run."""
    saved = []
    atomic_save = distill.atomic_save
    monkeypatch.setattr(distill, "atomic_save",
                        lambda state, path: saved.append(state["step"]) or atomic_save(state, path))
    tokenizer.main(tok_args(standin_teacher, str(tmp_path / "tok"), "--epochs", "2", "--ckpt-every", "1000"))
    dit.main(dit_args(cache, str(tmp_path / "dit"), "--ckpt-every", "1000"))
    assert saved == [8, 16, 5, 10]
    saved.clear()  # generator milestones keep their own cadence: they were written only where latest.pt fell
    dit.main(dit_args(cache, str(tmp_path / "dit_m"), "--ckpt-every", "1000", "--save-every", "3"))
    assert saved == [3, 5, 6, 9, 10]
    assert sorted(f for f in os.listdir(tmp_path / "dit_m") if f.startswith("step_")) == [
        "step_0000003.pt", "step_0000006.pt", "step_0000009.pt"]


def test_bench_is_one_rule_in_every_trainer(standin_teacher, cache, tmp_path, capsys):
    """--bench N in each trainer: N steps, the first untimed, nothing written, a last line of key=value pairs
    (three significant figures): median step time, images/s, peak memory, the batch-independent state, the
    activations kept per sample and the estimate for one micro-batch (state + batch x activations)."""
    out = str(tmp_path / "bench")
    distill.main(STANDIN_TINY + ["--out", out, "--bench", "3"])
    tokenizer.main(tok_args(standin_teacher, out, "--bench", "3"))
    tokenizer.main(tok_args(standin_teacher, out, "--bench", "3", "--gan-start-epoch", "0"))
    dit.main(dit_args(cache, out, "--bench", "3"))
    assert not os.path.exists(out)
    lines = [l for l in capsys.readouterr().out.splitlines() if " bench: " in l]
    assert [l.split(" bench: ")[0] for l in lines] == ["stand-in teacher", "RecTok stage 1", "RecTok stage 1",
                                                       "DiT^DH-tiny"]
    keys = ["step_s", "images_per_s", "peak_mem_gb", "state_gib", "act_mib_per_sample", "est_gib_per_gpu"]
    for line in lines:
        batch = int(re.search(r"2 steps timed after 1 warm-up, micro-batch (\d+): ", line).group(1))
        pairs = dict(re.findall(r"(\w+)=(\S+)", line))
        assert list(pairs) == keys, line
        assert all("e" not in v and float(v) == float(f"{float(v):.3g}") > 0 for v in pairs.values()), line
        state, act, est = (float(pairs[k]) for k in keys[3:])
        assert est == pytest.approx(state + batch * act / 1024, rel=0.01), line


def host_reads(monkeypatch, run):
    """How many tensor values `run()` reads on the host (item, float, bool, tolist)."""
    count = [0]
    with monkeypatch.context() as m:
        for name in ("item", "__float__", "__bool__", "tolist"):
            def counted(self, *a, original=getattr(torch.Tensor, name)):
                count[0] += 1
                return original(self, *a)
            m.setattr(torch.Tensor, name, counted)
        run()
    return count[0]


def test_a_training_step_reads_nothing_back_from_the_device(standin_teacher, cache, tmp_path, monkeypatch):
    """The losses stay on the device between log lines: in each trainer, 4 steps read as many tensor values
    on the host as 2 (those of the stop: its log line, the finite check, the checkpoint). On a GPU each read
    in the step would make the host wait for the step to finish."""
    trainers = {
        "distill": lambda out, k: distill.main(STANDIN_TINY + ["--out", out, "--stop-at", k, "--log-every", "99"]),
        "tokenizer": lambda out, k: tokenizer.main(tok_args(standin_teacher, out, "--gan-start-epoch", "0",
                                                            "--stop-at", k, "--log-every", "99")),
        "dit": lambda out, k: dit.main(dit_args(cache, out, "--stop-at", k, "--log-every", "99"))}
    for name, train in trainers.items():
        reads = [host_reads(monkeypatch, lambda: train(str(tmp_path / f"{name}{k}"), str(k))) for k in (2, 4)]
        assert reads[0] == reads[1], (name, reads)


def test_tokenizer_bench_needs_no_earlier_stage(tmp_path, monkeypatch):
    """`tokenizer.py [finetune] --bench` on a machine with no stand-in teacher and no stage-1 checkpoint
    writes nothing: with --random-weights it times untrained nets of the preset's architecture, without it
    it says how to get the teacher (stage 1 used to train one first, minutes spent and runs/teacher
    written; stage 2 needed a stage-1 checkpoint)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(distill, "train_standin", lambda args: pytest.fail("--bench trained a stand-in teacher"))
    tiny = ["--bench", "2", "--batch-size", "8", "--num-train", "16", "--workers", "0"]
    for mode in ([], ["finetune"]):
        result = tokenizer.main(mode + tiny + ["--random-weights"])
        assert result["images_per_s"] > 0 and os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="--bench writes nothing.*python distill.py.*--random-weights"):
        tokenizer.main(tiny)
    assert os.listdir(tmp_path) == []


def test_dit_bench_needs_no_cache(tmp_path, monkeypatch, capsys):
    """`dit.py --bench N --random-latents` times the generator's step on random latents in the shape of the
    preset's cache (the paper's: 128 channels, a 16 x 16 grid, 1,000 classes) and writes nothing; before,
    a bench at the paper's sizes needed an encoded ImageNet cache."""
    monkeypatch.chdir(tmp_path)
    result = dit.main(["--bench", "2", "--random-latents", "--batch-size", "4", "--workers", "0"])
    assert result["images_per_s"] > 0 and os.listdir(tmp_path) == []
    assert "8 latents (16 x 8^2)" in capsys.readouterr().out  # the tiny tokenizer's cache: C = 16, 8 x 8
    moments, label = dit.RandomLatents("paper", 1001)[1000]
    assert moments.shape == (16 * 16, 2 * 128) and label == 0
    with pytest.raises(SystemExit):
        dit.parse_args(["--random-latents"])  # training needs a cache
    with pytest.raises(SystemExit):  # a cache named beside the noise was never read
        dit.parse_args(["--bench", "2", "--random-latents", "--latents", "/data/latents"])
    assert "--latents: only with --random-latents off" in capsys.readouterr().err


def test_unwritable_out_and_full_disk(standin_teacher, stage1_run, tmp_path, monkeypatch):
    """A folder that cannot be written fails at the start, not after training; a write that runs out of
    space says so, naming the device's file, and leaves the previous file and no temporary: also when
    torch.save reports it only as "unexpected pos", and when encode makes a shard on a full disk (its
    memory-mapped writes died of SIGBUS); temporaries of a killed write are removed at the next start."""
    with pytest.raises(OSError, match="cannot write to /proc/rectok_out"):
        tokenizer.main(tok_args(standin_teacher, "/proc/rectok_out"))

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="no space left on the device holding .*x.pt"):
        distill.atomic_write(str(tmp_path / "x.pt"), full)
    assert os.listdir(tmp_path) == []

    def torch_full(f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1408 vs 1302")

    (tmp_path / "y.pt").write_bytes(b"the previous checkpoint")
    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=0))
        with pytest.raises(OSError, match="no space left on the device holding .*y.pt"):
            distill.atomic_write(str(tmp_path / "y.pt"), torch_full)
    assert os.listdir(tmp_path) == ["y.pt"] and (tmp_path / "y.pt").read_bytes() == b"the previous checkpoint"
    (tmp_path / "y.pt").unlink()

    def no_room(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", no_room)
        with pytest.raises(OSError, match="no space left on the device holding .*moments.00000.npy"):
            tokenizer.main(encode_args(stage1_run, str(tmp_path / "cache")))
    assert not [f for f in os.listdir(tmp_path / "cache") if distill.STALE_TEMPORARY.fullmatch(f)]
    out = tmp_path / "run"
    out.mkdir()
    (out / "latest.pt.tmp12345").write_bytes(b"left by a kill")
    tokenizer.main(tok_args(standin_teacher, str(out), "--stop-at", "1"))
    assert "latest.pt.tmp12345" not in os.listdir(out) and "latest.pt" in os.listdir(out)


def test_tokenizer_bad_inputs(standin_teacher, tmp_path, capsys):
    out = str(tmp_path / "run")
    for argv, message in ((["--image-size", "30", "--patch-size", "8"], "multiple of the patch size"),
                          (["--mask-ratio", "1"], "need mask_ratio_min <= mask_ratio < 1"),
                          (["evaluate", "--rfid", "--num-eval", "1"], "--num-eval 1: ")):
        with pytest.raises(SystemExit):  # at the command line: they failed after a teacher's training, a pass
            tokenizer.parse_args(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        tokenizer.main(tok_args(standin_teacher, out, "--data", str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="python distill.py"):
        tokenizer.main(tok_args(str(tmp_path / "missing.pt"), out))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tokenizer.RecTok(img_size=30, patch_size=8)
    for ratios in ({"mask_ratio": 1.0}, {"mask_ratio": 0.3, "mask_ratio_min": 0.5}):  # before any step
        with pytest.raises(ValueError, match="need mask_ratio_min <= mask_ratio < 1"):
            tokenizer.RecTok(32, 8, 8, "micro", "micro", sem_size="micro", teacher_dim=16, **ratios)
    with pytest.raises(RuntimeError, match="perceptual-weight 0"):  # offline, no perceptual weights
        tokenizer.main(tok_args(standin_teacher, out, "--perceptual-weight", "1",
                                "--vgg16-weights", "http://127.0.0.1:9/vgg16.pth"))
    with pytest.raises(ValueError, match="128 images, fewer than one global batch of 256"):
        tokenizer.main(tok_args(standin_teacher, out, "--grad-accum", "16"))  # 16 x 16: no step per epoch
    tokenizer.main(tok_args(standin_teacher, out, "--stop-at", "1"))
    with pytest.raises(ValueError, match="resumes only the run it saved.*--channels: 8 there, 4 now"):
        tokenizer.main(tok_args(standin_teacher, out, "--channels", "4"))
    with pytest.raises(FileNotFoundError, match="not found"):
        tokenizer.load_tokenizer(str(tmp_path / "none.pt"))


#################################################################################
#          Tokenizer: decoder fine-tuning, evaluation, latent cache             #
#################################################################################


def test_finetune_changes_only_the_decoder(stage1_run, tmp_path):
    out = str(tmp_path / "ft")
    tokenizer.main(["finetune", "--init", stage1_run, "--out", out, "--num-train", "64", "--batch-size", "16",
                    "--epochs", "1", "--workers", "0", "--grid-every", "0", "--gan-start-epoch", "0"])
    s1 = torch.load(stage1_run, weights_only=True)
    s2 = torch.load(os.path.join(out, "latest.pt"), weights_only=True)
    assert s2["step"] == 4 and s2["config"]["sem_decoder"] == "none" and s2["config"]["mask_ratio"] == 0
    assert not any(k.startswith("sem_decoder.") for k in s2["ema"])
    for part in ("model", "ema"):
        for k, v in s2[part].items():
            if k.startswith("encoder."):
                assert torch.equal(v, s1["ema"][k]), (part, k)  # the stage-1 EMA encoder, frozen
    changed = [k for k in s2["model"] if k.startswith("decoder.") and not torch.equal(s2["model"][k], s1["ema"][k])]
    assert len(changed) > 10
    assert s2["d_optimizer"]["state"]  # a fresh discriminator trained from step 0
    state = torch.get_rng_state()  # reading the stage-1 weights draws nothing from the seeded stream of stage 2
    tokenizer.stage1_weights(stage1_run)
    assert torch.equal(torch.get_rng_state(), state)


def test_finetune_from_the_released_stage1_layout(parity_sizes, tmp_path):
    """Stage 2 starts from the authors' RecTok.pth as from ours (they fine-tuned RecTok_decft.pth from it):
    its config read off the weights, its EMA encoder frozen. It used to be refused (no config/ema)."""
    _, w = parity("tokenizer_full_reconstruct")
    torch.save({"model": w, "model_ema": w}, tmp_path / "RecTok.pth")
    out = str(tmp_path / "ft")
    tokenizer.main(["finetune", "--init", str(tmp_path / "RecTok.pth"), "--out", out, "--num-train", "16",
                    "--batch-size", "8", "--epochs", "1", "--workers", "0", "--grid-every", "0"])
    s2 = torch.load(os.path.join(out, "latest.pt"), weights_only=True)
    released = tokenizer.from_official(w)
    assert s2["step"] == 2 and s2["config"]["channels"] == 8 and s2["config"]["img_size"] == 32
    assert all(torch.equal(v, released[k]) for k, v in s2["ema"].items() if k.startswith("encoder."))
    assert any(not torch.equal(v, released[k]) for k, v in s2["model"].items() if k.startswith("decoder."))
    state = torch.get_rng_state()  # no model is built to read them (its init would move the seeded stream)
    tokenizer.stage1_weights(str(tmp_path / "RecTok.pth"))
    assert torch.equal(torch.get_rng_state(), state)


def test_evaluate_writes_metrics(stage1_run):
    results = tokenizer.main(["evaluate", "--ckpt", stage1_run, "--num-eval", "24", "--batch-size", "8",
                              "--workers", "0"])
    folder = os.path.dirname(stage1_run)
    with open(os.path.join(folder, "metrics_synthetic.json")) as f:
        saved = json.load(f)
    for weights in ("model", "ema"):
        assert 0 < saved[weights]["psnr"] < 60 and saved[weights]["num_images"] == 24
        assert saved[weights]["psnr"] == pytest.approx(results[weights]["psnr"])
        assert os.path.isfile(os.path.join(folder, f"eval_synthetic_{weights}.png"))
    model = tokenizer.load_tokenizer(stage1_run)  # PSNR by hand for the EMA weights
    data = distill.build_dataset("synthetic", 32, "val", 24)
    x = torch.stack([data[i][0] for i in range(24)])
    mse = ((model.reconstruct(x) - (x * 0.5 + 0.5)) ** 2).mean(dim=(1, 2, 3))
    assert (-10 * torch.log10(mse)).mean().item() == pytest.approx(saved["ema"]["psnr"], rel=1e-4)


def test_evaluate_on_another_data_set_keeps_the_first(stage1_run, tmp_path):
    """Outputs are named by the data set (two folders both named val included), and --out puts them
    elsewhere."""
    for root, n in (("x", 2), ("y", 3)):
        for c in ("a", "b"):
            (tmp_path / root / "val" / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.random.default_rng(i).integers(0, 255, (36, 40, 3), np.uint8)).save(
                    tmp_path / root / "val" / c / f"{i}.png")
    tokenizer.main(["evaluate", "--ckpt", stage1_run, "--num-eval", "8", "--workers", "0", "--out", str(tmp_path)])
    first = (tmp_path / "metrics_synthetic.json").read_bytes()
    for root, n in (("x", 2), ("y", 3)):
        data = str(tmp_path / root / "val")
        tokenizer.main(["evaluate", "--ckpt", stage1_run, "--data", data, "--workers", "0", "--out", str(tmp_path)])
    assert (tmp_path / "metrics_synthetic.json").read_bytes() == first
    for root, n in (("x", 2), ("y", 3)):
        data = str(tmp_path / root / "val")
        metrics = json.loads((tmp_path / f"metrics_{tokenizer.data_tag(data)}.json").read_text())
        assert metrics["data"] == data and metrics["ema"]["num_images"] == 2 * n
        assert (tmp_path / f"eval_{tokenizer.data_tag(data)}_ema.png").is_file()


def read_cache(root):
    arrays = {n: read_cache_array(root, n) for n in ("moments", "moments_flip", "labels", "done")}
    arrays.update({f"stats_{k}": v for k, v in np.load(os.path.join(root, "stats.npz")).items()})
    return arrays


def test_cache_is_complete_and_matches_the_model(stage1_run, cache):
    arrays = read_cache(cache)
    assert arrays["done"].all() and arrays["moments"].shape == (40, 16, 16)
    # one file per shard and array, each written by one process only (no pages shared across ranks)
    assert sorted(f for f in os.listdir(cache) if f.startswith("moments.")) == [
        "moments.00000.npy", "moments.00001.npy", "moments.00002.npy"]
    assert [len(np.load(os.path.join(cache, f"done.{k:05d}.npy"))) for k in range(3)] == [16, 16, 8]
    assert arrays["moments"].dtype == np.float16 and arrays["labels"].tolist() == [i % 10 for i in range(40)]
    model = tokenizer.load_tokenizer(stage1_run)
    data = distill.build_dataset("synthetic", 32, "train", 40)
    x = torch.stack([data[i][0] for i in (0, 39)])
    with torch.no_grad():
        ref = model.moments(torch.cat([x, x.flip(-1)])).numpy().astype(np.float16)
    assert np.array_equal(arrays["moments"][[0, 39]], ref[:2])
    assert np.array_equal(arrays["moments_flip"][[0, 39]], ref[2:])
    means = arrays["moments"][..., :8].astype(np.float64).reshape(-1, 8)  # float64 reference statistics
    np.testing.assert_allclose(arrays["stats_mean"], means.mean(0), rtol=1e-10)
    np.testing.assert_allclose(arrays["stats_std"], means.std(0), rtol=1e-8)


def test_cache_reader(cache, tmp_path):
    data = tokenizer.LatentCache(cache, seed=3)
    moments, label = data[5]
    assert moments.shape == (16, 16) and moments.dtype == torch.float32 and label == 5
    flipped = read_cache_array(cache, "moments_flip")
    flips = [torch.equal(data[i][0], torch.from_numpy(flipped[i].astype(np.float32))) for i in range(40)]
    assert 5 < sum(flips) < 35  # about half come from the flipped image
    again = tokenizer.LatentCache(cache, seed=3)
    assert all(torch.equal(data[i][0], again[i][0]) for i in range(40))  # a pure function of (seed, epoch, i)
    batch = torch.stack([data[i][0] for i in range(4)])
    z = tokenizer.sample_latent(batch, data.mu, data.sigma, grid=4, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4, 8, 4, 4) and torch.isfinite(z).all()
    with pytest.raises(ValueError, match="does not match"):
        tokenizer.LatentCache(cache, expect={"fingerprint": "another tokenizer", "channels": 8})
    with pytest.raises(ValueError, match="channels: cache has 8, expected 16"):
        tokenizer.LatentCache(cache, expect={"channels": 16})
    with pytest.raises(FileNotFoundError, match="encode"):
        tokenizer.LatentCache(str(tmp_path))


def test_finetune_two_processes_resume_exactly(stage1_run, tmp_path):
    """Stage 2 on 2 gloo processes with its fresh discriminator from step 0: no unused trainable parameter
    (the mask token is frozen), ranks agree, and stop-and-resume equals the uninterrupted run."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["finetune", "--init", stage1_run, "--num-train", "64", "--batch-size", "8", "--epochs", "1",
              "--workers", "0", "--grid-every", "0", "--gan-start-epoch", "0", "--log-every", "1"]
    run = torchrun("tokenizer.py", [*common, "--out", a])
    torchrun("tokenizer.py", [*common, "--out", b, "--stop-at", "2"])
    torchrun("tokenizer.py", [*common, "--out", b])
    ckpt = assert_same_runs(a, b, ("model", "ema", "discriminator"))
    assert ckpt["step"] == 4 and "disc" in run.stdout


def test_cache_same_with_two_processes(stage1_run, cache, tmp_path):
    out = str(tmp_path / "ddp")
    run = torchrun("tokenizer.py", encode_args(stage1_run, out))
    one, two = read_cache(cache), read_cache(out)
    for k in one:
        np.testing.assert_allclose(one[k], two[k], rtol=1e-12, err_msg=k)
    assert "KiB per image" in run.stdout and "img/s" in run.stdout


def test_interrupted_encode_resumes_to_the_same_files(stage1_run, cache, tmp_path):
    out = str(tmp_path / "resumed")
    tokenizer.main(encode_args(stage1_run, out))
    for name in ("done", "moments"):  # as if killed in the middle of shard 1, before shard 2
        a = np.load(os.path.join(out, f"{name}.00001.npy"), mmap_mode="r+")
        a[6:] = 0
        a.flush()
    for name in ("moments", "moments_flip", "labels", "done"):
        os.remove(os.path.join(out, f"{name}.00002.npy"))
    os.remove(os.path.join(out, "stats.npz"))
    tokenizer.main(encode_args(stage1_run, out))
    one, two = read_cache(cache), read_cache(out)
    for k in one:
        np.testing.assert_array_equal(one[k], two[k], err_msg=k)


def test_encode_refuses_to_resume_into_a_cache_of_other_images(stage1_run, cache, tmp_path):
    out = str(tmp_path / "c")
    shutil.copytree(cache, out)
    with pytest.raises(ValueError, match="seed: cache has 0, expected 1.*encode into a fresh --out"):
        tokenizer.main(encode_args(stage1_run, out, "--seed", "1"))
    with pytest.raises(ValueError, match="num_images: cache has 40, expected 30"):
        tokenizer.main(encode_args(stage1_run, out, "--num-train", "30"))
    with open(os.path.join(cache, "meta.json")) as f:
        meta = json.load(f)
    assert (meta["data"], meta["split"], meta["seed"], meta["num_images"]) == ("synthetic", "train", 0, 40)
    assert "center crop 32 px" in meta["crop"]


#################################################################################
#                                fid.py                                         #
#################################################################################


def image_cases(d):
    """The image inputs of an Inception vector file, images_S, each with its outputs features_S."""
    cases = [(k, d["outputs"]["features_" + k[len("images_"):]]) for k in d["inputs"] if k.startswith("images_")]
    assert cases
    return cases


@pytest.mark.parametrize("name,mode", [("fid_inception_pytorch_fid", "pytorch-fid"),
                                       ("fid_inception_torch_fidelity", "tf")])
def test_fid_inception_parity(name, mode):
    d, w = parity(name)
    assert_supported(name, d["config"], output_blocks=[3], resize_input=True, normalize_input=True,
                     use_fid_inception=True, name="inception-v3-compat")
    model = fid.FIDInception()
    model.load_state_dict(w)
    model.eval()
    for key, out in image_cases(d):
        with torch.no_grad():
            pool3, logits = model(fid.preprocess(d["inputs"][key], mode))
        if isinstance(out, dict):  # torch-fidelity: also the logits with and without the bias
            assert_close(pool3, out["2048"])
            assert_close(logits, out["logits_unbiased"])
            assert_close(logits + model.fc.bias, out["logits"])
        else:
            assert_close(pool3, out)


def test_tf1_resize_parity():
    d, _ = parity("fid_inception_torch_fidelity")
    ramp = d["inputs"]["tiny_ramp"].float()
    smallest = min((v for k, v in d["inputs"].items() if k.startswith("images_")), key=lambda v: v.shape[-1])
    for key, ref in d["outputs"]["tf1_resize"].items():  # resize_<source>_to_<size>, the size read off ref
        source = ramp if key.startswith(f"resize_{ramp.shape[-2]}x{ramp.shape[-1]}_") else smallest[:1].float()
        assert_close(fid.resize_tf1(source, tuple(ref.shape[-2:])), ref)


def test_frechet_parity():
    d, _ = parity("frechet")
    for pair, ref in d["outputs"]["fid"].items():
        a, b = (d["inputs"][k].double().numpy() for k in pair.split("__"))
        value = fid.frechet_distance(*fid.statistics(a), *fid.statistics(b))
        assert value == pytest.approx(ref["pytorch_fid"], rel=1e-6), pair
        assert value == pytest.approx(ref["torch_fidelity"], rel=1e-6), pair


def test_inception_score_parity():
    d, _ = parity("inception_score")
    c = d["config"]
    assert_supported("inception_score", c, shuffle=True)
    n = len(d["outputs"]["permutation"])
    assert np.array_equal(np.random.RandomState(c["rng_seed"]).permutation(n), d["outputs"]["permutation"].numpy())
    for key in d["inputs"]:
        mean, std = fid.inception_score(d["inputs"][key].numpy(), splits=c["splits"], seed=c["rng_seed"])
        assert mean == pytest.approx(d["outputs"][key]["mean"], rel=1e-6)
        assert std == pytest.approx(d["outputs"][key]["std"], rel=1e-6)


def test_fid_inception_loaded_channels_last(tmp_path):
    """Through load() (channels-last weights, the fast CPU path) the features stay the reference's."""
    d, w = parity("fid_inception_torch_fidelity")
    torch.save(w, tmp_path / "inception.pth")
    model = fid.FIDInception().load(str(tmp_path / "inception.pth"))
    for key, out in image_cases(d):
        with torch.no_grad():
            pool3, logits = model(fid.preprocess(d["inputs"][key]))
        assert_close(pool3, out["2048"])
        assert_close(logits, out["logits_unbiased"])


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 16))
    mu, sigma = fid.statistics(a)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9  # identical sets
    shift = rng.normal(size=16)
    assert fid.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx((shift ** 2).sum(), rel=1e-9)
    # 2-D by hand: S1 = diag(1, 4), S2 = diag(4, 1): tr sqrt(S1 S2) = 2 + 2, so FID = |dmu|^2 + 5 + 5 - 8
    value = fid.frechet_distance(np.zeros(2), np.diag([1.0, 4.0]), np.array([1.0, 1.0]), np.diag([4.0, 1.0]))
    assert value == pytest.approx(4.0, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        fid.statistics(a[:1])
    with pytest.raises(ValueError, match="non-finite"):
        fid.statistics(np.full((4, 2), np.nan))


def test_too_few_samples_for_a_covariance_warn():
    with pytest.warns(UserWarning, match="from 20 samples of 32-d features: the covariance is singular"):
        fid.statistics(np.random.default_rng(0).normal(size=(20, 32)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid.statistics(np.random.default_rng(0).normal(size=(40, 32)))


def test_precision_recall_on_shifted_sets():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(400, 8))
    assert fid.precision_recall(ref + 0.0, ref)["precision"] == 1.0
    far = fid.precision_recall(ref + 10.0, ref)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    narrow = fid.precision_recall(rng.normal(size=(400, 8)) * 0.3, ref)  # mode collapse: precise, low recall
    assert narrow["precision"] > 0.9 and narrow["recall"] < 0.5


def test_fid_cli_and_sources_agree(inception_files):
    r = inception_files
    weights = ["--inception-weights", str(r / "inception.pth"), "--batch-size", "4"]
    with warnings.catch_warnings():  # batches of an .npz's read-only memory map are copies, not views
        warnings.filterwarnings("error", message=".*not writable")
        m = fid.main([str(r / "a.npz"), str(r / "b.npz"), "--is", "--pr", "--save-stats", str(r / "a_stats.npz"),
                      "--json", str(r / "m.json"), *weights])
    assert np.isfinite(m["fid"]) and m["fid"] > 0 and m["inception_score"] >= 1.0
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    folder = fid.main([str(r / "a_png"), str(r / "b.npz"), "--json", str(r / "m2.json"), *weights])
    stats = fid.main([str(r / "a_stats.npz"), str(r / "b.npz"), "--json", str(r / "m3.json"), *weights])
    assert folder["fid"] == pytest.approx(m["fid"], rel=1e-9) and stats["fid"] == pytest.approx(m["fid"], rel=1e-9)
    with open(r / "m.json") as f:
        assert json.load(f)["fid"] == pytest.approx(m["fid"])
    mixed = r / "mixed_sizes"  # a folder like ImageNet's val: torch.stack stopped on the second size
    shutil.copytree(r / "a_png", mixed)
    b_images = np.load(r / "b.npz")["arr_0"]
    for i in range(2):
        Image.fromarray(b_images[i]).save(mixed / f"b{i}.png")
    model = fid.FIDInception().load(str(r / "inception.pth"))
    feats = fid.features(model, str(mixed), batch_size=5)[0]
    alone = [fid.features(model, str(folder), batch_size=5)[0] for folder in (r / "a_png", r / "b.npz")]
    np.testing.assert_allclose(feats, np.concatenate([alone[0], alone[1][:2]]), rtol=1e-5, atol=1e-6)
    np.savez(r / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="mu"):
        fid.load_statistics(str(r / "bad.npz"))
    with pytest.raises(RuntimeError, match="pt_inception"):
        fid.FIDInception().load(str(r / "no_weights.pth"))


def test_fid_cli_bad_inputs(inception_files, tmp_path, monkeypatch, capsys):
    """What fid.py cannot do fails before the Inception runs: an unwritable --json (by default beside the
    first source, which may be a read-only data set) or --save-stats used to fail after every feature was
    computed, as did --pr against statistics with no images; --is of statistics printed no IS and said
    nothing, --pr with one source likewise. --save-stats makes a missing folder; two statistics files
    are compared without the Inception (it was loaded, or downloaded, for nothing)."""
    r, weights = inception_files, ["--inception-weights", str(inception_files / "inception.pth")]
    with monkeypatch.context() as m:
        m.setattr(fid, "features", lambda *a: pytest.fail("features computed before the outputs were checked"))
        for flag in ("--json", "--save-stats"):
            with pytest.raises(OSError, match=f"cannot write /proc/rectok_fid/x.* pass {flag} a writable path"):
                fid.main([str(r / "a.npz"), flag, "/proc/rectok_fid/x", *weights])
    fid.main([str(r / "a.npz"), "--save-stats", str(tmp_path / "new" / "a"), "--json", str(tmp_path / "m.json"),
              *weights])
    assert set(np.load(tmp_path / "new" / "a.npz").files) == {"mu", "sigma"}
    stats, images = str(tmp_path / "new" / "a.npz"), str(r / "a.npz")
    monkeypatch.setattr(fid.FIDInception, "load", lambda *a: pytest.fail("the Inception loaded before the check"))
    for argv, says in (([stats, "--is"], "--is needs images"), ([images, "--pr"], "--pr compares two sources"),
                       ([images, stats, "--pr"], "--pr compares two sources"), ([str(r / "missing")], "not found"),
                       ([images, "--batch-size", "0"], "at least 1")):
        with pytest.raises(SystemExit):
            fid.main([*argv, "--json", str(tmp_path / "m.json"), *weights])
        assert says in capsys.readouterr().err, argv
    both = fid.main([stats, stats, "--json", str(tmp_path / "m.json")])  # statistics alone: no Inception
    assert both["fid"] == pytest.approx(0, abs=1e-6)


def test_fid_refuses_objects_and_statistics_that_are_no_covariance(tmp_path):
    """An image .npz of Python objects crashed the process (rc 139), and statistics that are no covariance
    (asymmetric, not positive semi-definite, nan) scored "fid": -22733.6 or nan: each is refused, naming
    the file."""
    images = str(tmp_path / "objects.npz")
    np.savez(images, arr_0=np.array([np.zeros((8, 8, 3), np.uint8), "x"], dtype=object))
    with pytest.raises(ValueError, match="objects.npz: its arr_0 holds Python objects"):
        fid.npz_images(images)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    good = a @ a.T
    bad = {"asymmetric": good + np.triu(np.ones((6, 6)), 1), "indefinite": good - 2 * np.abs(good).max() * np.eye(6),
           "nan": np.where(np.eye(6) > 0, np.nan, good), "objects": np.array([good, "x"], dtype=object)}
    np.savez(tmp_path / "good.npz", mu=np.zeros(6), sigma=good)
    assert fid.load_statistics(str(tmp_path / "good.npz"))[1].shape == (6, 6)
    for name, sigma in bad.items():
        path = str(tmp_path / f"{name}.npz")
        np.savez(path, mu=np.zeros(6), sigma=sigma)
        with pytest.raises(ValueError, match=f"{name}.npz: "):
            fid.load_statistics(path)


def test_fid_files_are_written_atomically(tmp_path):
    """--json and --save-stats go through a temporary file: a kill mid-write keeps the previous file."""
    path = tmp_path / "fid_metrics.json"
    path.write_text("previous")

    def killed(f):
        f.write(b'{"fid": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fid.write_atomically(str(path), killed)
    assert path.read_text() == "previous" and os.listdir(tmp_path) == ["fid_metrics.json"]


def test_reference_batch_statistics_are_used_as_stored(inception_files, tmp_path):
    """An .npz holding mu/sigma AND images (the ADM reference batch layout) is statistics for FID: its
    stored mu/sigma, not those of its images, which serve precision/recall only."""
    r = inception_files
    weights = ["--inception-weights", str(r / "inception.pth"), "--batch-size", "4"]
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=2048) * 0.01, np.eye(2048) * 0.02
    b = np.load(r / "b.npz")["arr_0"]
    np.savez(tmp_path / "ref.npz", arr_0=b, mu=mu, sigma=sigma)
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma)
    both = fid.main([str(r / "a.npz"), str(tmp_path / "ref.npz"), "--pr", "--json", str(tmp_path / "1.json"),
                     *weights])
    stats = fid.main([str(r / "a.npz"), str(tmp_path / "stats_only.npz"), "--json", str(tmp_path / "2.json"), *weights])
    images = fid.main([str(r / "a.npz"), str(r / "b.npz"), "--json", str(tmp_path / "3.json"), *weights])
    assert both["fid"] == stats["fid"] != pytest.approx(images["fid"])
    assert 0 <= both["precision"] <= 1  # from the reference's images


def test_image_npz_is_read_by_shard_not_whole(tmp_path):
    """Each rank maps the samples .npz and reads only its shard (np.savez stores members uncompressed)."""
    a = np.random.default_rng(0).integers(0, 256, size=(9, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", labels=np.arange(9), arr_0=a)
    mapped = fid.npz_images(str(tmp_path / "s.npz"))
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, a)
    np.savez_compressed(tmp_path / "c.npz", arr_0=a)
    assert np.array_equal(fid.npz_images(str(tmp_path / "c.npz")), a)


def test_evaluate_rfid(stage1_run, inception_files, tmp_path, monkeypatch):
    """rFID through fid.py: reference statistics are computed once (one Inception pass over the originals
    for both sets of weights) and then read from the cache (no pass over the originals at all)."""
    ref, seen, forward = str(tmp_path / "ref.npz"), [], fid.FIDInception.forward
    monkeypatch.setattr(fid.FIDInception, "forward", lambda self, x: seen.append(len(x)) or forward(self, x))
    args = ["evaluate", "--ckpt", stage1_run, "--num-eval", "12", "--batch-size", "6", "--workers", "0",
            "--rfid", "--inception-weights", str(inception_files / "inception.pth"), "--ref-stats", ref]
    first = tokenizer.main(args)
    assert os.path.isfile(ref) and sum(seen) == 12 + 2 * 12  # originals once, reconstructions of model, ema
    mtime = os.path.getmtime(ref)
    seen.clear()
    second = tokenizer.main(args)
    assert os.path.getmtime(ref) == mtime and sum(seen) == 2 * 12
    for weights in ("model", "ema"):
        assert np.isfinite(first[weights]["rfid"]) and first[weights]["rfid"] >= 0
        assert second[weights]["rfid"] == pytest.approx(first[weights]["rfid"], rel=1e-9)


def test_evaluate_reference_statistics_are_named_by_their_images(stage1_run, inception_files, tmp_path,
                                                                 monkeypatch):
    """The default --ref-stats file names the images it holds: other images (here the built-in data's val
    split with another --seed; for folders, another absolute path) get their own file, where they used to
    read the first set's statistics (runs/fid_stats/synthetic_32px_N.npz for any seed)."""
    monkeypatch.chdir(tmp_path)
    common = ["evaluate", "--ckpt", stage1_run, "--num-eval", "3", "--workers", "0", "--rfid",
              "--inception-weights", str(inception_files / "inception.pth")]
    seeded = [tokenizer.main([*common, "--seed", seed])["ema"]["rfid"] for seed in ("0", "1")]
    assert len(os.listdir(tmp_path / "runs" / "fid_stats")) == 2 and seeded[0] != seeded[1]
    paths = {tokenizer.default_ref_stats(tokenizer.parse_args(["evaluate", "--data", d]), 256, 50000)
             for d in ("/a/val", "/b/val", "/a/val/")}
    assert len(paths) == 2 and all(os.path.basename(p).startswith("val_256px_50000_") for p in paths)


def test_evaluate_two_processes_equal_one(stage1_run, inception_files, tmp_path):
    """`tokenizer.py evaluate --rfid` under torchrun: uneven shards (6 and 7 of 13 images), each image
    once, the same PSNR, reference statistics and rFID as one process."""
    common = ["evaluate", "--ckpt", stage1_run, "--num-eval", "13", "--batch-size", "4", "--workers", "0",
              "--rfid", "--inception-weights", str(inception_files / "inception.pth")]
    one = tokenizer.main([*common, "--out", str(tmp_path / "one"), "--ref-stats", str(tmp_path / "one.npz")])
    run = torchrun("tokenizer.py", [*common, "--out", str(tmp_path / "two"), "--ref-stats", str(tmp_path / "two.npz")])
    assert re.search(r"ema: psnr \d+\.\d{4}, num_images 13, rfid", run.stdout), run.stdout  # a count, not 13.0000
    with open(tmp_path / "two" / "metrics_synthetic.json") as f:
        two = json.load(f)
    for weights in ("model", "ema"):
        assert two[weights]["num_images"] == one[weights]["num_images"] == 13
        assert two[weights]["psnr"] == pytest.approx(one[weights]["psnr"], rel=1e-6)
        assert two[weights]["rfid"] == pytest.approx(one[weights]["rfid"], rel=1e-3)
    ref_one, ref_two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for k in ("mu", "sigma"):
        np.testing.assert_allclose(ref_two[k], ref_one[k], rtol=1e-4, atol=1e-7, err_msg=k)


def test_fid_features_two_processes_equal_one(inception_files):
    r = inception_files
    weights = ["--inception-weights", str(r / "inception.pth"), "--batch-size", "2", "--is"]
    one = fid.main([str(r / "a.npz"), "--save-stats", str(r / "one.npz"), "--json", str(r / "one.json"),
                    *weights])
    torchrun("fid.py", [str(r / "a.npz"), "--save-stats", str(r / "two.npz"), "--json", str(r / "two.json"),
                        *weights])
    with open(r / "two.json") as f:
        two = json.load(f)
    a, b = np.load(r / "one.npz"), np.load(r / "two.npz")  # features gathered in index order
    np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a["sigma"], b["sigma"], rtol=1e-5, atol=1e-9)
    assert two["inception_score"] == pytest.approx(one["inception_score"], rel=1e-6)


def test_fid_ranks_use_their_own_gpu(monkeypatch):
    """Under torchrun on CUDA each fid.py process is made current on its LOCAL_RANK's GPU: NCCL's object
    gather of the features runs on the current device, GPU 0 for every rank before. Checked without a GPU."""
    made = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", made.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("RANK", raising=False)
    assert fid.setup_device() == torch.device("cuda", 1) and made == [1]


#################################################################################
#                                  dit.py                                       #
#################################################################################


def dit_from_reference(c, w=None):
    """Our DiTDH from a reference config, with the reference's weights `w` (none: our own init)."""
    assert_supported("DiTwDDTHead", c, patch_size=1, force_one_d_seq=0, mlp_ratio=4.0, use_qknorm=False,
                     use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False, use_pos_embed=True)
    model = dit.DiTDH(channels=c["token_channels"], grid=c["img_size"] // c["tokenizer_patch_size"],
                      trunk=(c["hidden_size"][0], c["depth"][0], c["num_heads"][0]),
                      head=(c["hidden_size"][1], c["depth"][1], c["num_heads"][1]), num_classes=c["num_classes"])
    if w is not None:
        model.load_state_dict(w)
    return model.eval()


def test_ditdh_forward_parity():
    d, w = parity("ditdh_forward")
    fresh = dit_from_reference(d["config"])
    for k in d["fixed_keys"]:  # sin-cos table and RoPE buffers computed as the reference does
        torch.testing.assert_close(fresh.state_dict()[k], d["fixed_tensors"][k], rtol=0, atol=1e-6)
    model = dit_from_reference(d["config"], w)
    i = d["inputs"]
    with torch.no_grad():
        assert_close(model(i["x"], i["t"], i["y"]), d["outputs"]["velocity"])


def test_transport_parity():
    d, w = parity("transport")
    model, i, o = dit_from_reference(d["config"], w), d["inputs"], d["outputs"]
    cases = {k: v for k, v in o["losses"].items() if isinstance(v, dict)}
    assert cases
    for ref in cases.values():
        s = ref["time_dist_shift"]
        assert_close(dit.train_time(i["u"], s), ref["t"])
        with torch.no_grad():
            loss = dit.flow_matching_loss(model, i["x1"], i["y"], s, i["x0"], i["u"])
        assert_close(loss, ref["loss_per_sample"])
    if "model_forward_loss" in o["losses"]:  # the model's own transport: its shift from its latent shape
        own = tokenizer.latent_shift(model.grid, model.channels)
        with torch.no_grad():
            loss = dit.flow_matching_loss(model, i["x1"], i["y"], own, i["x0"], i["u"]).mean()
        assert loss.item() == pytest.approx(o["losses"]["model_forward_loss"].item(), rel=1e-5)
    for ref in o["time_sampling"].values():
        assert_close(dit.train_time(i["u_vector"], ref["shift"]), ref["t"])
    for ref in o["euler_grids"].values():
        assert_close(dit.euler_grid(ref["N"], ref["shift"]), ref["grid"])


def test_sampler_parity():
    d, w = parity("sampler")
    model, i, o = dit_from_reference(d["config"], w), d["inputs"], d["outputs"]
    guide = dit_from_reference(d["extra_models"]["guide"]["config"], reference_weights(d["extra_models"]["guide"]))
    s, n = d["config"]["timestep_shift"], d["config"]["num_grid_points"]
    assert_close(dit.euler_grid(n, s), o["grid"])
    cases = [k for k in o if isinstance(o[k], dict) and "samples" in o[k]]
    assert cases
    for name in cases:
        kw = {"cfg": o[name]["cfg"], "guide": guide if name.startswith("autoguidance") else None,
              "interval": tuple(o[name].get("cfg_interval", (0.0, 1.0)))}  # the released generate's (0, 1)
        traj = dit.sample(model, i["z0"], i["y"], n, s, trajectory=True, **kw)
        # CFG stores the [cond | uncond] halves of its doubled batch; ours is the conditional half
        assert_close(traj, o[name]["trajectory"][:, :len(i["y"])])
        assert_close(traj[-1], o[name]["samples"])


def test_guidance_acts_only_inside_its_interval():
    """Both guidances keep to the interval, as the authors' forward_with_cfg and forward_with_autoguidance
    do: outside it the step is the model's alone (autoguidance ignored it)."""
    d, w = parity("sampler")
    model, i = dit_from_reference(d["config"], w), d["inputs"]
    guide = dit_from_reference(d["extra_models"]["guide"]["config"], reference_weights(d["extra_models"]["guide"]))
    s, n = d["config"]["timestep_shift"], d["config"]["num_grid_points"]
    plain = dit.sample(model, i["z0"], i["y"], n, s)
    for kw in ({"cfg": 1.5}, {"cfg": 1.29, "guide": guide}):
        # no Euler step starts at t = 1
        assert torch.equal(dit.sample(model, i["z0"], i["y"], n, s, interval=(1.0, 1.0), **kw), plain)
        assert not torch.equal(dit.sample(model, i["z0"], i["y"], n, s, **kw), plain)


def test_sampler_reads_nothing_back_from_the_device(monkeypatch):
    """An Euler step with guidance on an interval reads no tensor value on the host: on a GPU each read waits
    for the step before it (CFG's interval test did, 150 times per batch at the paper's grid)."""
    d, w = parity("sampler")
    model, i = dit_from_reference(d["config"], w), d["inputs"]
    s, n = d["config"]["timestep_shift"], d["config"]["num_grid_points"]
    expect = dit.sample(model, i["z0"], i["y"], n, s, cfg=1.5, interval=(0.0, 0.7))
    for read in ("__float__", "__bool__", "item"):
        monkeypatch.setattr(torch.Tensor, read, lambda *a, read=read: pytest.fail(f"the sampler read {read}"))
    got = dit.sample(model, i["z0"], i["y"], n, s, cfg=1.5, interval=(0.0, 0.7))
    monkeypatch.undo()
    assert torch.equal(got, expect)


@pytest.mark.parametrize("name,size,params", [("DiTDDT_xl_C128.json", "XL", 835.3e6),
                                              ("DiTDDT_s_C128.json", "S", 193.6e6)])
def test_official_dit_keys_load_strictly(name, size, params):
    keys = official_keys(name)
    sd = {k: torch.empty(s, device="meta") for k, s in keys["model_state_dict"].items()}
    assert dit.official_config(sd) == dict(channels=128, grid=16, trunk=dit.SIZES[size][0],
                                           head=dit.SIZES[size][1], num_classes=1000)
    with torch.device("meta"):
        model = dit.DiTDH(**dit.official_config(sd))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(s) for k, s in
                                                                          keys["model_state_dict"].items()}
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-3)
    assert set(keys["model_ema"]) == {k for k, _ in model.named_parameters()}


def test_load_dit_official_ema_without_buffers(tmp_path):
    """The authors' EMA holds parameters only; the RoPE tables are filled in from ours."""
    d, w = parity("ditdh_forward")
    ema = {k: v for k, v in w.items() if not k.endswith(("freqs_cos", "freqs_sin"))}
    torch.save({"model_ema": ema}, tmp_path / "ddt.pth")
    model = dit.load_dit(str(tmp_path / "ddt.pth"), heads=(4, 4))
    i = d["inputs"]
    with torch.no_grad():
        assert_close(model(i["x"], i["t"], i["y"]), d["outputs"]["velocity"])


def test_dit_loss_falls(cache, tmp_path):
    out = str(tmp_path / "fall")
    dit.main(dit_args(cache, out, "--epochs", "12", "--lr", "2e-3", "--hold-epochs", "12"))
    model = dit.load_dit(os.path.join(out, "latest.pt"), weights="model")
    fresh = dit.DiTDH(**model.config).eval()
    data = tokenizer.LatentCache(cache, flip=False)
    g = torch.Generator().manual_seed(0)
    moments = torch.stack([data[i][0] for i in range(40)])
    y = torch.tensor([data[i][1] for i in range(40)])
    x1 = tokenizer.sample_latent(moments, data.mu, data.sigma, 4, generator=g)
    x0, u = torch.randn(x1.shape, generator=g), torch.rand(40, generator=g)
    s = tokenizer.latent_shift(4, 8)
    with torch.no_grad():
        before = dit.flow_matching_loss(fresh, x1, y, s, x0, u).mean().item()
        after = dit.flow_matching_loss(model, x1, y, s, x0, u).mean().item()
    assert after < 0.8 * before, (before, after)


def test_dit_lr_decay_ends_at_its_own_epoch():
    """`--preset paper --epochs 80` is the first 80 epochs of the released 800-epoch schedule."""
    args = dit.parse_args(["--preset", "paper", "--epochs", "80", "--latents", "x"])
    assert args.decay_end_epoch == 800 and args.epochs == 80
    assert dit.hold_then_linear(40, args) == args.lr == 2e-4
    assert dit.hold_then_linear(80, args) == pytest.approx(2e-4 - 40 / 760 * 1.8e-4)
    assert dit.hold_then_linear(800, args) == pytest.approx(2e-5)
    assert dit.hold_then_linear(900, args) == pytest.approx(2e-5)


def test_dit_resume_is_exact(cache, tmp_path, monkeypatch):
    """Stop at step 3 and resume equals the straight run; each preview is written once, every
    --preview-every steps and where a run stops, and none at --preview-every 0. The first half of the stopped
    run makes no preview: loading the tokenizer that decodes them leaves the run's random stream alone (it
    drew the generator's init)."""
    written, save = [], dit.save_preview
    monkeypatch.setattr(dit, "save_preview", lambda *a: written.append(os.path.basename(a[3])) or save(*a))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    dit.main(dit_args(cache, a, "--preview-every", "5"))
    dit.main(dit_args(cache, b, "--stop-at", "3"))  # --preview-every 0: none (one was made at the stop)
    dit.main(dit_args(cache, b, "--preview-every", "4"))
    ca, cb = (torch.load(os.path.join(x, "latest.pt"), weights_only=True) for x in (a, b))
    assert ca["step"] == cb["step"] == 10
    for part in ("model", "ema"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    assert os.path.isfile(os.path.join(a, "preview_0000010.png"))  # decoded by the cache's tokenizer
    assert written == [f"preview_{s:07d}.png" for s in (5, 10, 4, 8, 10)]  # run a, then run b's second half


def test_dit_is_the_same_with_loader_workers(cache, tmp_path):
    """Loader processes change nothing: each epoch's flip choice reaches the workers (a worker holds a copy
    of the cache), so 2 workers, stopped in the second epoch and resumed, end where 0 workers do."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    dit.main(dit_args(cache, a))
    dit.main(dit_args(cache, b, "--workers", "2", "--stop-at", "7"))
    dit.main(dit_args(cache, b, "--workers", "2"))
    assert assert_same_runs(a, b, ("model", "ema"))["step"] == 10


def test_dit_two_processes_resume_exactly(cache, tmp_path):
    """2 gloo processes: ranks agree (checked at every checkpoint), and a stop at step 3 plus a resume ends
    bit-identical to the uninterrupted 2-process run, also when the stopped and resumed run recomputes its
    blocks in backward (--grad-checkpoint)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run = torchrun("dit.py", dit_args(cache, a, "--batch-size", "4"))
    torchrun("dit.py", dit_args(cache, b, "--batch-size", "4", "--stop-at", "3", "--grad-checkpoint"))
    torchrun("dit.py", dit_args(cache, b, "--batch-size", "4", "--grad-checkpoint"))
    ckpt = assert_same_runs(a, b, ("model", "ema"))
    assert ckpt["step"] == 10 and len(ckpt["rng"]) == 2 and "img/s" in run.stdout


def test_grad_checkpoint_keeps_loss_and_gradients_with_fewer_activations():
    """--grad-checkpoint (each transformer block recomputed in backward: the tokenizer's encoder, pixel and
    semantic decoders, DiT^DH's trunk and head) gives the loss and gradients of the plain pass to float
    tolerance, with at least 2x fewer activations kept per sample (the --bench measure)."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    tok = tokenizer.RecTok(32, 4, 8, "mini", "mini", "mini", teacher_dim=16).train()
    gen = dit.DiTDH(channels=8, grid=4, trunk=(64, 2, 4), head=(96, 2, 4), num_classes=10).train()
    x, x1, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 8, 4, 4), torch.arange(4)

    def tok_loss(n=4):
        torch.manual_seed(1), random.seed(1)  # the same masking, posterior and flow draws in both passes
        out = tok(x[:n])
        return out["decoded"].float().square().mean() + out["sem_pred"].float().square().mean()

    def dit_loss(n=4):
        torch.manual_seed(2)
        return dit.flow_matching_loss(gen, x1[:n], y[:n], 2.0).mean()

    for model, loss in ((tok, tok_loss), (gen, dit_loss)):
        plain = loss()
        plain.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        act = distill.activation_mib_per_sample(loss, cpu)
        distill.enable_grad_checkpoint(model)
        ckpt = loss()
        ckpt.backward()
        torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close({k: p.grad for k, p in model.named_parameters() if p.grad is not None}, grads,
                                   rtol=1e-4, atol=1e-6)
        assert 2 * distill.activation_mib_per_sample(loss, cpu) <= act, type(model).__name__


def test_the_bf16_path_runs_on_the_cpu(standin_teacher, stage1_run, cache, dit_run, tmp_path, monkeypatch):
    """The CUDA runs' mixed precision forced on the CPU (distill.BF16_ON_CPU): a step of stage 1 with every
    loss and the GAN on, of stage 2, of DiT^DH with label dropout, the guided samplers and the probe's
    feature pass run their nets in bf16 and keep fp32 where it matters: finite fp32 losses and loss terms,
    fp32 master weights and EMA, fp32 features."""
    monkeypatch.setattr(distill, "BF16_ON_CPU", True)
    nets, losses, weights, terms = [], [], [], set()  # nets' output dtypes; losses; weights and EMA; term names

    def spy(cls, name, record):
        original = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda *a, **k: record(original(*a, **k)))

    spy(tokenizer.PixelDecoder, "forward", lambda out: nets.append(out.dtype) or out)
    spy(dit.DiTDH, "forward", lambda out: nets.append(out.dtype) or out)
    spy(tokenizer.Encoder, "forward", lambda out: nets.append(out[0].dtype) or out)
    spy(tokenizer.TokenizerLoss, "generator_loss",
        lambda out: losses.extend([out[0], *out[1].values()]) or terms.update(out[1]) or out)
    spy(dit, "flow_matching_loss", lambda out: losses.append(out) or out)
    ema_update, tf32 = distill.update_ema, []
    monkeypatch.setattr(distill, "update_ema", lambda ema, model, decay: weights.extend(
        [*ema.parameters(), *model.parameters()]) or ema_update(ema, model, decay))
    monkeypatch.setattr(distill, "enable_tf32", tf32.append)  # each trainer asks for TF32 (on CUDA)
    out = str(tmp_path / "bench")
    tokenizer.main(tok_args(standin_teacher, out, "--bench", "2", "--random-weights", "--perceptual-weight", "1",
                            "--gan-start-epoch", "0", "--batch-size", "2"))
    assert terms == {"rec", "perceptual", "kl", "sem", "gan"}
    tokenizer.main(["finetune", "--random-weights", "--bench", "2", "--batch-size", "4", "--num-train", "16",
                    "--workers", "0", "--out", out])
    dit.main(dit_args(cache, out, "--bench", "2"))
    model = dit.load_dit(dit_run)
    z0, y = torch.randn(2, model.channels, model.grid, model.grid), torch.arange(2)
    for guide in (None, model):
        with distill.autocast(torch.device("cpu")):
            samples = dit.sample(model, z0, y, 4, cfg=1.5, guide=guide)
        assert samples.dtype == torch.float32 and torch.isfinite(samples).all()
    tok = tokenizer.load_tokenizer(stage1_run)
    data = distill.build_dataset("synthetic", 32, "val", 8)
    feats, _ = probe.extract(tok, data, "flow", [0.0, 0.5], probe_args(batch_size=4, workers=0), torch.device("cpu"))
    assert all(f.dtype == torch.float32 and torch.isfinite(f).all() for f in feats.values())
    assert nets and set(nets) == {torch.bfloat16}
    assert losses and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in losses)
    assert weights and {w.dtype for w in weights} == {torch.float32}
    assert tf32 == [torch.device("cpu")] * 3


def test_tf32_in_the_trainers_never_in_the_fid_inception(monkeypatch):
    """enable_tf32 turns TF32 on for fp32 matmuls and convolutions on CUDA (not on the CPU); the FID
    Inception computes in full fp32 whatever was set (PyTorch's own default runs cuDNN convolutions in
    TF32), and leaves the setting as it found it."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    try:
        distill.enable_tf32(torch.device("cpu"))
        assert (matmul.fp32_precision, conv.fp32_precision) == saved
        distill.enable_tf32(torch.device("cuda"))
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
        seen = []
        monkeypatch.setattr(fid.FIDInception, "features",
                            lambda self, x: seen.append((matmul.fp32_precision, conv.fp32_precision)) or (x, x))
        fid.FIDInception()(torch.zeros(1, 3, 8, 8))
        assert seen == [("ieee", "ieee")] and (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def test_checkpoints_are_memory_mapped_not_read_whole(tmp_path):
    """Every rank of an 8-GPU node read a whole 13 GB generator checkpoint into host memory to take its EMA
    (about 107 GB); load_checkpoint maps the file, so what is not used is not read: a 400 MB file whose
    small EMA is used raises the process's resident memory by far less than its size (the current size:
    the peak is inherited from the parent process through exec)."""
    path = str(tmp_path / "big.pt")
    torch.save({"kind": "generator", "model": {"w": torch.ones(100 * 2**20)}, "ema": {"w": torch.ones(16)}}, path)
    code = ("import re, sys, distill; rss = lambda: int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status')"
            ".read()).group(1)); before = rss(); c = distill.load_checkpoint(sys.argv[1], ('generator',), 'x'); "
            "assert c['ema']['w'].sum() == 16; print((rss() - before) // 1024)")
    run = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) < 100, f"loading took {run.stdout.strip()} MB"


def test_compiled_steps_equal_eager_ones():
    """--compile (torch.compile of the transformer blocks): tokenizer stage-1 steps whose MAE masking keeps
    another number of tokens each batch, a DiT^DH step and the guided sampler give the eager losses,
    gradients and samples to float tolerance."""
    assert_compiled_equals_eager(torch.device("cpu"))


def assert_compiled_equals_eager(device):
    torch.manual_seed(0)
    tok = tokenizer.RecTok(32, 4, 8, "micro", "micro", "micro", teacher_dim=16).to(device).train()
    gen = dit.DiTDH(channels=8, grid=4, trunk=(64, 1, 4), head=(64, 1, 4), num_classes=10).to(device).train()
    torch.nn.init.normal_(gen.final_layer.linear.weight, std=0.02)  # not adaLN-Zero's 0: the head's gradients flow
    x, x1 = (torch.rand(4, 3, 32, 32) * 2 - 1).to(device), torch.randn(4, 8, 4, 4).to(device)
    y = torch.arange(4, device=device)

    def tok_loss(model, ratio):
        torch.manual_seed(1)
        out = model(x, ratio=ratio)
        return out["decoded"].float().square().mean() + out["sem_pred"].float().square().mean()

    def dit_loss(model, _):
        torch.manual_seed(2)
        return dit.flow_matching_loss(model, x1, y, 2.0).mean()

    for eager, loss, cases in ((tok, tok_loss, (0.4, 0.1, 0.25)), (gen, dit_loss, (None,))):
        compiled = copy.deepcopy(eager)
        distill.compile_blocks(compiled, tokenizer.Block, dit.Block)
        blocks = [m for m in compiled.modules() if isinstance(m, (tokenizer.Block, dit.Block))]
        assert blocks and all(b._compiled_call_impl is not None for b in blocks)
        for case in cases:
            losses, grads = [], []
            for model in (eager, compiled):
                model.zero_grad(set_to_none=True)
                value = loss(model, case)
                value.backward()
                losses.append(value)
                grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)
    gen.eval(), compiled.eval()
    z0 = torch.randn(4, 8, 4, 4).to(device)
    torch.testing.assert_close(dit.sample(compiled, z0, y, 5, cfg=1.5), dit.sample(gen, z0, y, 5, cfg=1.5),
                               rtol=1e-4, atol=1e-5)


#: the tests named test_cuda_*: `python -m pytest -q test_all.py -k cuda` on a GPU machine (.ci/gpu runs them)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_trainers_take_bf16_steps(standin_teacher, cache, tmp_path):
    """On a GPU: a bench of each trainer (the stand-in teacher, stage 1 with every loss and the GAN on,
    stage 2, DiT^DH with label dropout) in bf16 autocast with TF32, finite, with the memory report."""
    out = str(tmp_path / "bench")
    runs = [distill.main(STANDIN_TINY + ["--out", out, "--bench", "3"]),
            tokenizer.main(tok_args(standin_teacher, out, "--bench", "3", "--random-weights", "--perceptual-weight",
                                    "1", "--gan-start-epoch", "0")),
            tokenizer.main(["finetune", "--random-weights", "--bench", "3", "--batch-size", "4", "--num-train", "16",
                            "--workers", "0", "--out", out]),
            dit.main(dit_args(cache, out, "--bench", "3"))]
    for result in runs:
        assert result["images_per_s"] > 0 and result["act_mib_per_sample"] > 0 and result["peak_mem_gb"] > 0
    assert not os.path.exists(out)


@cuda
def test_cuda_compile_equals_eager():
    assert_compiled_equals_eager(torch.device("cuda"))


@cuda
def test_cuda_sampler_and_one_process_nccl(dit_run, cache, tmp_path):
    """The guided sampler on the GPU in bf16, and a generator bench under torchrun on NCCL."""
    out = str(tmp_path / "samples")
    sample.main(sample_args(dit_run, out, "--cfg", "1.5", "--judge", ""))
    assert len(os.listdir(os.path.join(out, "images"))) == 14
    run = torchrun("dit.py", dit_args(cache, str(tmp_path / "nccl"), "--bench", "3"), nproc=1)
    assert "act_mib_per_sample=" in run.stdout


@cuda
def test_cuda_memory_report_at_ditdh_s_size():
    """DiT^DH-S at the paper's latent shape: the allocator's activation count is positive and checkpointing
    the blocks divides it by more than 2."""
    argv = ["--preset", "paper", "--model", "S", "--random-latents", "--bench", "3", "--batch-size", "16"]
    plain, ckpt = dit.main(argv), dit.main(argv + ["--grad-checkpoint"])
    assert plain["act_mib_per_sample"] > 2 * ckpt["act_mib_per_sample"] > 0


def assert_close_runs(a, b, parts):
    """Two run folders whose latest.pt hold `parts` equal to float tolerance, at the same step."""
    ca, cb = (torch.load(os.path.join(x, "latest.pt"), weights_only=True) for x in (a, b))
    assert ca["step"] == cb["step"]
    for part in parts:
        torch.testing.assert_close(ca[part], cb[part], rtol=1e-4, atol=1e-5)
    return ca


def logged_losses(text):
    return [float(v) for v in re.findall(r"^step \d+/\d+ .*?\bloss (\S+)", text, flags=re.M)]


def test_dit_grad_accum_is_one_larger_batch(cache, tmp_path, capsys):
    """--grad-accum 2 at batch 4 takes the optimizer steps of batch 8 in one piece, to float tolerance, on
    1 process and on 2: the step's random numbers are drawn for its whole batch, its gradients averaged
    over the micro-batches with one all-reduce, and the logged loss is their mean."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    dit.main(dit_args(cache, a, "--stop-at", "3"))
    whole = logged_losses(capsys.readouterr().out)
    dit.main(dit_args(cache, b, "--batch-size", "4", "--grad-accum", "2", "--stop-at", "3"))
    assert logged_losses(capsys.readouterr().out) == pytest.approx(whole, rel=1e-4) and len(whole) == 3
    assert assert_close_runs(a, b, ("model", "ema", "optimizer"))["step"] == 3
    c, d = str(tmp_path / "c"), str(tmp_path / "d")
    torchrun("dit.py", dit_args(cache, c, "--batch-size", "4", "--stop-at", "2"))
    torchrun("dit.py", dit_args(cache, d, "--batch-size", "2", "--grad-accum", "2", "--stop-at", "2"))
    assert_close_runs(c, d, ("model", "ema"))


def test_preemption_saves_the_step_and_resumes_exactly(cache, tmp_path):
    """SIGTERM to torchrun mid-epoch (a cluster preempting the job): both ranks finish the step, save it
    together, say so in one line and exit; resumed, the run ends bit-identical to an uninterrupted one.
    Before, everything since the last --ckpt-every checkpoint (hours at the paper's sizes) was lost."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    extra = ["--batch-size", "4", "--epochs", "40", "--ckpt-every", "1000"]  # 5 steps an epoch, 200 in all
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "dit.py"), *dit_args(cache, b, *extra)]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE)
    for line in launcher.stdout:
        if line.startswith("step 12/"):
            launcher.send_signal(signal.SIGTERM)
            break
    output = launcher.stdout.read()
    launcher.wait(timeout=120)
    said = re.search(r"SIGTERM: stopped at step (\d+) of 200 and saved (\S+); run the same command", output)
    assert said, output[-3000:]
    step = int(said.group(1))
    assert 12 <= step < 200 and torch.load(os.path.join(b, "latest.pt"), weights_only=True)["step"] == step
    torchrun("dit.py", dit_args(cache, b, *extra))
    torchrun("dit.py", dit_args(cache, a, *extra))
    assert assert_same_runs(a, b, ("model", "ema"))["step"] == 200


def test_a_cache_of_many_shards_keeps_few_files_open(stage1_run, tmp_path):
    """Each memory-mapped array held an open file, 4 per shard: ImageNet's 313 shards passed the common
    limit of 1,024 and encode and training died with "Too many open files". A cache of 64 one-image shards
    now encodes, and trains a generator, under a limit of 100 open files."""
    cache, run = str(tmp_path / "cache"), str(tmp_path / "dit")
    commands = [[sys.executable, "tokenizer.py", *encode_args(stage1_run, cache, "--shard-size", "1",
                                                                        "--num-train", "64")],
                [sys.executable, "dit.py", *dit_args(cache, run, "--stop-at", "3")]]
    script = "ulimit -n 100 && " + " && ".join(shlex.join(c) for c in commands)
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=HERE, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(glob.glob(os.path.join(cache, "moments.*.npy"))) == 64
    assert torch.load(os.path.join(run, "latest.pt"), weights_only=True)["step"] == 3


def test_encode_and_sampling_stop_after_the_batch_on_a_signal(stage1_run, cache, dit_run, tmp_path, monkeypatch,
                                                              capsys):
    """SIGUSR1 (or SIGTERM) while encoding or sampling: the batch in hand is finished and written, the stage
    says how far it got and exits, and the same command then finishes the job, as an uninterrupted run
    would have (before, the signal killed it mid-batch)."""
    def signal_at_first_call(fn):
        """fn, whose first call first signals this process (a cluster asking the stage to stop)."""
        calls = []

        def signalled(*args, **kwargs):
            if not calls:
                os.kill(os.getpid(), signal.SIGUSR1)
            calls.append(1)
            return fn(*args, **kwargs)
        return signalled

    out = str(tmp_path / "cache")
    monkeypatch.setattr(tokenizer.RecTok, "moments", signal_at_first_call(tokenizer.RecTok.moments))
    assert tokenizer.main(encode_args(stage1_run, out)) is None
    assert "SIGUSR1: stopped with 12 of rank 0's 40 images written" in capsys.readouterr().out
    samples = str(tmp_path / "samples")
    monkeypatch.setattr(sample, "generate", signal_at_first_call(sample.generate))
    assert sample.main(sample_args(dit_run, samples)) is None
    assert "SIGUSR1: stopped with 4 of 14 images written" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(samples, "images"))) == [f"{i:06d}.png" for i in range(4)]
    monkeypatch.undo()
    tokenizer.main(encode_args(stage1_run, out))
    for name in ("moments", "moments_flip", "labels"):
        assert np.array_equal(read_cache_array(out, name), read_cache_array(cache, name)), name
    sample.main(sample_args(dit_run, samples))
    assert len(np.load(os.path.join(samples, "samples.npz"))["labels"]) == 14


WAIT_SCRIPT = """
import datetime, os, sys, time
sys.path.insert(0, sys.argv[1])
import distill
distill.TIMEOUT = datetime.timedelta(seconds=2)
rank, world, _ = distill.setup_distributed()
time.sleep(4 * rank)
distill.wait_for_all()
print(f"rank {rank} waited", flush=True)
time.sleep(4 * rank)
try:
    distill.barrier()
except Exception:
    print(f"rank {rank}: the plain barrier timed out", flush=True)
os._exit(0)
"""


def test_long_one_sided_work_outwaits_the_timeout(tmp_path):
    """A collective that waits past distill.TIMEOUT fails (on GPUs NCCL's watchdog ends the job). The waits
    after one-sided work (ranks sampling or encoding unequal shares, rank 0 packing 50,000 PNGs) use
    wait_for_all, which does not time out: with a 2 s timeout, rank 1 works 4 s before each wait."""
    script = tmp_path / "wait.py"
    script.write_text(WAIT_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), HERE]
    output = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=HERE).stdout
    assert "rank 0 waited" in output and "rank 1 waited" in output, output
    assert "rank 0: the plain barrier timed out" in output, output


def test_a_resume_continues_only_the_run_it_saved(cache, tmp_path):
    """Only the model config and the global batch were compared: the seed, the epochs (the lr jumped), the
    lr, the EMA, a loss setting or the data could change between a stop and its resume, and the run trained
    on; the stand-in teacher's --data OTHER overwrote a teacher.pt trained on other data. Every setting that
    shapes the result now refuses the resume, naming each difference; run-control flags may change."""
    out = str(tmp_path / "run")
    dit.main(dit_args(cache, out, "--stop-at", "2"))
    for flag, value in (("--lr", "5e-4"), ("--epochs", "3"), ("--seed", "1"), ("--ema", "0.5"),
                        ("--label-dropout", "0.2"), ("--preset", "paper")):
        with pytest.raises(ValueError, match=f"resumes only the run it saved.*{flag}: \\S+ there, \\S+ now"):
            dit.main(dit_args(cache, out, flag, value))
    assert dit.main(dit_args(cache, out, "--log-every", "3", "--ckpt-every", "4", "--workers", "1",
                             "--batch-size", "4", "--grad-accum", "2", "--grad-checkpoint")) == 10
    teacher, rng = str(tmp_path / "teacher"), np.random.default_rng(0)
    distill.main(STANDIN_TINY + ["--out", teacher, "--stop-at", "1"])
    for i in range(80):  # another data set: 2 classes of 40 images
        os.makedirs(tmp_path / "other" / f"c{i % 2}", exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(tmp_path / "other" / f"c{i % 2}" / f"{i}.png")
    with pytest.raises(ValueError, match="--data: synthetic there, .*other now"):
        distill.main(STANDIN_TINY + ["--out", teacher, "--data", str(tmp_path / "other")])


def test_one_run_per_folder(cache, tmp_path, capsys):
    """A run holds its --out (OUT/.lock: host, pid, start time): a second run there is refused, naming the
    holder, and leaves the holder's live temporary file alone (it took it for a crash's and deleted it, and
    the first run died); a lock whose process is gone is taken over with a line saying so; a finished run
    leaves no lock. The same for every stage that writes a folder (here the generator and the sampler)."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"host": socket.gethostname(), "pid": live.pid, "start": distill.process_start(live.pid)}
        with open(os.path.join(out, ".lock"), "w") as f:
            json.dump(holder, f)
        open(os.path.join(out, "latest.pt.tmp999"), "wb").close()  # the live run's checkpoint being written
        with pytest.raises(RuntimeError, match=f"in use by another run \\(process {live.pid} on this host"):
            dit.main(dit_args(cache, out, "--stop-at", "1"))
        assert os.path.exists(os.path.join(out, "latest.pt.tmp999"))
    finally:
        live.kill()
        live.wait()
    dit.main(dit_args(cache, out, "--stop-at", "1"))
    assert f"taking over the lock of process {live.pid}, which is gone" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, ".lock"))
    with open(os.path.join(out, ".lock"), "w") as f:
        json.dump(dict(holder, host="node-7"), f)
    with pytest.raises(RuntimeError, match="in use by a run on host node-7"):
        sample.main(sample_args(os.path.join(out, "latest.pt"), out))


def test_dit_resume_refuses_other_latents_or_global_batch(cache, tmp_path):
    """A generator run resumes only on the latents it trained on and with its global batch (lr, epoch
    position); written by 2 processes, it continues on 1 with the same global batch."""
    out, other = str(tmp_path / "run"), str(tmp_path / "other_cache")
    shutil.copytree(cache, other)
    torchrun("dit.py", dit_args(cache, out, "--batch-size", "4", "--stop-at", "2"))
    with pytest.raises(ValueError, match="resumes only the run it saved.*--latents: .*cache0 there"):
        dit.main(dit_args(other, out, "--batch-size", "8"))
    with pytest.raises(ValueError, match="another global batch .8, this run: 4"):
        dit.main(dit_args(cache, out, "--batch-size", "4"))  # 1 process: half the global batch
    assert dit.main(dit_args(cache, out, "--batch-size", "8")) == 10  # same global batch: continues


def test_dit_says_when_previews_are_off(cache, tmp_path, capsys, monkeypatch):
    """A cache whose tokenizer file is gone trains without previews, and says so (it said nothing). With
    previews off (--preview-every 0) no tokenizer is loaded (its weights were loaded and hashed for nothing)."""
    with monkeypatch.context() as m:
        m.setattr(tokenizer, "load_tokenizer", lambda *a, **k: pytest.fail("a tokenizer was loaded"))
        dit.main(dit_args(cache, str(tmp_path / "no_previews"), "--stop-at", "1"))
    moved = str(tmp_path / "latents")
    shutil.copytree(cache, moved)
    with open(os.path.join(moved, "meta.json")) as f:
        meta = json.load(f)
    distill.write_json(os.path.join(moved, "meta.json"), dict(meta, tokenizer=str(tmp_path / "gone.pt")))
    dit.main(dit_args(moved, str(tmp_path / "run"), "--stop-at", "1", "--preview-every", "1"))
    assert "previews off" in capsys.readouterr().out
    assert not [f for f in os.listdir(tmp_path / "run") if f.startswith("preview")]


def test_dit_mismatch_errors(cache, tmp_path, parity_sizes):
    d, w = parity("tokenizer_full_reconstruct")  # a tokenizer with other weights than the cache's
    other = str(tmp_path / "other.pth")
    torch.save({"model_ema": w}, other)
    with pytest.raises(ValueError, match="does not match"):
        dit.main(dit_args(cache, str(tmp_path / "x"), "--tokenizer", other, "--preview-every", "5"))
    out = str(tmp_path / "run")
    dit.main(dit_args(cache, out, "--stop-at", "1"))
    with pytest.raises(ValueError, match="resumes only the run it saved.*--model: tiny there, S now"):
        dit.main(dit_args(cache, out, "--model", "S"))
    with pytest.raises(FileNotFoundError, match="encode"):
        dit.main(dit_args(str(tmp_path / "no_cache"), out))
    with pytest.raises(ValueError, match="40 images, fewer than one global batch of 64"):
        dit.main(dit_args(cache, str(tmp_path / "big_batch"), "--batch-size", "64"))
    with pytest.raises(FileNotFoundError, match="not found"):
        dit.load_dit(str(tmp_path / "none.pt"))


#################################################################################
#                                 sample.py                                     #
#################################################################################


def test_judge_scores(standin_teacher, stage1_run):
    """The offline judge: on its own held-out images it gives its recorded accuracy, with shuffled labels
    chance; the Frechet distance in its features is 0 for a set against itself and grows with blur."""
    judge, ckpt = probe.load_judge(standin_teacher, "cpu")
    val = distill.build_dataset("synthetic", 32, "val", 64)
    real, labels = probe.real_images(val, 64)
    same = probe.judge_scores(judge, real, labels, real, labels, "cpu")
    assert same["judge_accuracy_on_real"] == same["judge_class_accuracy"] == pytest.approx(ckpt["accuracy"])
    assert abs(same["judge_frechet_distance"]) < 1e-8 and same["chance"] == 0.1
    many, many_labels = probe.real_images(distill.build_dataset("synthetic", 32, "val", 1000), 1000)
    shuffled = np.random.default_rng(0).permutation(many_labels)
    assert abs(probe.judge_scores(judge, many, shuffled, real, labels, "cpu")["judge_class_accuracy"] - 0.1) < 0.04
    blurred = [torchvision.transforms.functional.gaussian_blur(torch.from_numpy(many).permute(0, 3, 1, 2), 7, s)
               .permute(0, 2, 3, 1).numpy() for s in (0.6, 1.5, 3.0)]
    distances = [probe.judge_scores(judge, b, many_labels, many, many_labels, "cpu")["judge_frechet_distance"]
                 for b in blurred]
    assert 0 < distances[0] < distances[1] < distances[2], distances
    with pytest.raises(ValueError, match="is a tokenizer checkpoint; expected a judge"):
        probe.load_judge(stage1_run, "cpu")


def test_sampling_fid_and_autoguidance(dit_run, inception_files, standin_teacher, tmp_path):
    """FID / IS with --ref-stats, and `probe.py judge`'s scores of the same samples beside them (judge.json)."""
    out, ref = str(tmp_path / "fid"), str(tmp_path / "ref.npz")
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    metrics = sample.main(sample_args(dit_run, out, "--guide", dit_run, "--cfg", "1.29", "--ref-stats", ref,
                                      "--inception-weights", str(inception_files / "inception.pth")))
    assert np.isfinite(metrics["fid"]) and metrics["num_samples"] == 14 and metrics["inception_score"] >= 1
    scores = probe.main(["judge", "--samples", os.path.join(out, "samples.npz"), "--judge", standin_teacher,
                         "--num-real", "50"])
    with open(os.path.join(out, "judge.json")) as f:
        judged = json.load(f)
    assert 0 <= judged["judge_class_accuracy"] <= 1 and judged["judge_frechet_distance"] > 0
    assert judged["judge_class_accuracy"] == scores["judge_class_accuracy"] and judged["num_samples"] == 14
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["fid"] == pytest.approx(metrics["fid"])


def test_judge_must_know_the_samples_classes(standin_teacher, tmp_path):
    """A judge of other classes than the samples' (the built-in data's stand-in against ImageNet samples),
    or a missing --data folder, fails before any image is judged, not with a judge.json of nonsense."""
    ckpt = torch.load(standin_teacher, weights_only=True)
    ckpt["config"]["num_classes"] = 5
    ckpt["ema"] = {k: v[:5] if k.startswith("head.") else v for k, v in ckpt["ema"].items()}
    five = str(tmp_path / "five.pt")
    torch.save(ckpt, five)
    samples = str(tmp_path / "samples.npz")
    np.savez(samples, arr_0=np.zeros((14, 32, 32, 3), np.uint8), labels=np.arange(14) % 10)
    with pytest.raises(ValueError, match="classifies 5 classes; the samples are labelled up to 9"):
        probe.main(["judge", "--samples", samples, "--judge", five])
    with pytest.raises(FileNotFoundError, match="data folder not found"):
        probe.main(["judge", "--samples", samples, "--judge", standin_teacher, "--data", str(tmp_path / "none")])
    with pytest.raises(FileNotFoundError, match="--samples .*none.npz not found: run sample.py first"):
        probe.main(["judge", "--samples", str(tmp_path / "none.npz"), "--judge", standin_teacher])
    assert not os.path.exists(tmp_path / "judge.json") and not hasattr(sample.parse_args([]), "judge")


def test_sampling_is_the_same_on_two_processes(dit_run, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    sample.main(sample_args(dit_run, one, "--cfg", "1.5"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29536",
           os.path.join(HERE, "sample.py"), *sample_args(dit_run, two, "--cfg", "1.5")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = np.load(os.path.join(one, "samples.npz")), np.load(os.path.join(two, "samples.npz"))
    assert a["arr_0"].shape == (14, 32, 32, 3) and a["arr_0"].dtype == np.uint8
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert np.bincount(a["labels"], minlength=10).tolist() == [2, 2, 2, 2, 1, 1, 1, 1, 1, 1]
    assert sorted(os.listdir(os.path.join(one, "images")))[0] == "000000.png"
    assert "img/s" in run.stdout
    with Image.open(os.path.join(one, "preview.png")) as preview:  # one row per class, the label at the left
        assert preview.size == (24 + 8 * 32, 10 * 32)


def test_interrupted_sampling_resumes_to_the_same_set(dit_run, tmp_path):
    out = str(tmp_path / "s")
    sample.main(sample_args(dit_run, out))
    first = np.load(os.path.join(out, "samples.npz"))["arr_0"]
    for i in (5, 6, 13):  # as if killed mid-run
        os.remove(os.path.join(out, "images", f"{i:06d}.png"))
    os.remove(os.path.join(out, "samples.npz"))
    sample.main(sample_args(dit_run, out))
    assert np.array_equal(np.load(os.path.join(out, "samples.npz"))["arr_0"], first)
    assert distill.indexed_noise((2, 2), 0, 7).equal(distill.indexed_noise((2, 2), 0, 7))
    assert not distill.indexed_noise((2, 2), 0, 7).equal(distill.indexed_noise((2, 2), 1, 7))


def test_sampling_refuses_a_folder_made_otherwise(dit_run, tmp_path, monkeypatch):
    """Images made with another seed (or generator, guidance, steps...) are never reused as this run's;
    each set of weights is hashed once for provenance.json (a hash costs about a second per GB)."""
    out, hashed, fingerprint = str(tmp_path / "s"), [], distill.weights_fingerprint
    monkeypatch.setattr(distill, "weights_fingerprint", lambda t: hashed.append(id(t)) or fingerprint(t))
    sample.main(sample_args(dit_run, out))
    assert len(hashed) == len(set(hashed)) == 3  # generator, tokenizer, latent statistics (no guide)
    for flags, what in ((["--seed", "1"], "seed: 0 there, 1 now"), (["--steps", "5"], "steps: 4 there, 5 now"),
                        (["--guide", dit_run, "--cfg", "1.5"], "guide: None there")):
        with pytest.raises(ValueError, match=f"other settings .*{what}.*sample into a fresh --out"):
            sample.main(sample_args(dit_run, out, *flags))
    os.remove(os.path.join(out, "provenance.json"))
    with pytest.raises(ValueError, match="no provenance.json"):
        sample.main(sample_args(dit_run, out))
    fresh = str(tmp_path / "killed_while_starting")  # a write probe left behind, no image yet
    os.makedirs(os.path.join(fresh, "images"))
    open(os.path.join(fresh, "images", ".write_test123"), "wb").close()
    sample.main(sample_args(dit_run, fresh))
    assert len(np.load(os.path.join(fresh, "samples.npz"))["labels"]) == 14


def test_sampling_retries_with_smaller_batches(dit_run, tmp_path, monkeypatch):
    """A crash that wrote no image (the GPU out of memory) and a retry at a smaller --batch-size: refused
    before ("made with other settings (batch_size: 5 there, 2 now)"). The batch size and the count change no
    image, and a folder with no image is free: half a set made at batch 4 is finished at batch 2, the same
    images, and then extended."""
    out, whole = str(tmp_path / "retry"), str(tmp_path / "whole")

    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory")

    with monkeypatch.context() as m:
        m.setattr(sample, "generate", out_of_memory)
        with pytest.raises(RuntimeError, match="out of memory"):
            sample.main(sample_args(dit_run, out, "--batch-size", "5"))
    assert os.path.isfile(os.path.join(out, "provenance.json"))
    sample.main(sample_args(dit_run, out, "--num-images", "8", "--batch-size", "4"))
    os.remove(os.path.join(out, "samples.npz"))
    for name in ("000006.png", "000007.png"):
        os.remove(os.path.join(out, "images", name))
    sample.main(sample_args(dit_run, out, "--num-images", "8", "--batch-size", "2"))
    sample.main(sample_args(dit_run, whole, "--num-images", "8", "--batch-size", "8"))
    assert np.array_equal(*(np.load(os.path.join(d, "samples.npz"))["arr_0"] for d in (out, whole)))
    sample.main(sample_args(dit_run, out, "--num-images", "10", "--batch-size", "2"))
    assert np.array_equal(np.load(os.path.join(out, "samples.npz"))["arr_0"][:8],
                          np.load(os.path.join(whole, "samples.npz"))["arr_0"])


def test_sampling_bad_inputs(dit_run, parity_sizes, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="generator checkpoint not found"):
        sample.main(sample_args(str(tmp_path / "none.pt"), str(tmp_path / "a")))
    with pytest.raises(FileNotFoundError, match="tokenizer checkpoint not found"):
        sample.main(sample_args(dit_run, str(tmp_path / "b"), "--tokenizer", str(tmp_path / "none.pt")))
    _, w = parity("tokenizer_full_reconstruct")
    torch.save({"model_ema": w}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="fingerprint"):
        sample.main(sample_args(dit_run, str(tmp_path / "c"), "--tokenizer", str(tmp_path / "other.pth")))
    with pytest.raises(FileNotFoundError, match="--latent-stats .* not found: pass the stats.npz"):
        sample.main(sample_args(dit_run, str(tmp_path / "d"), "--latent-stats", str(tmp_path / "none.npz")))
    with pytest.raises(FileNotFoundError, match="statistics file not found: .*none.npz"):  # before any sampling
        sample.main(sample_args(dit_run, str(tmp_path / "e"), "--ref-stats", str(tmp_path / "none.npz")))
    assert os.listdir(tmp_path / "e" / "images") == []
    ckpt = torch.load(dit_run, weights_only=True)  # a guide of another tokenizer's latents, then of other shape
    torch.save(dict(ckpt, latents=dict(ckpt["latents"], fingerprint="0" * 40)), tmp_path / "other_latents.pt")
    three = dict(ckpt["config"], num_classes=3)
    torch.save(dict(ckpt, config=three, ema=dit.DiTDH(**three).state_dict()), tmp_path / "three_classes.pt")
    for guide, says in (("other_latents.pt", "latents of another tokenizer"),
                        ("three_classes.pt", "(channels, grid, classes)")):
        with pytest.raises(ValueError, match=re.escape(says)):  # it sampled, steered by the wrong model
            sample.main(sample_args(dit_run, str(tmp_path / "g"), "--guide", str(tmp_path / guide), "--cfg", "1.29"))
    sample.parse_args(["--dit", dit_run, "--num-images", "1"])  # no distance asked for: it samples
    for flags, says in ((["--steps", "1"], "--steps 1: "), (["--num-images", "0"], "--num-images: "),
                        (["--batch-size", "0"], "--batch-size: "),
                        (["--cfg", "2", "--cfg-interval", "0.7", "0.2"], "--cfg-interval 0.7 0.2: "),
                        (["--cfg", "2", "--cfg-interval", "0", "1.5"], "--cfg-interval 0.0 1.5: "),
                        (["--guide", dit_run], "--guide: only with --cfg"),
                        (["--cfg-interval", "0", "0.7"], "--cfg-interval: only with --cfg"),
                        (["--num-images", "1", "--ref-stats", "r.npz"], "--num-images 1: ")):  # failed once sampled
        with pytest.raises(SystemExit):  # one grid point made no step: the samples were the initial noise
            sample.parse_args(["--dit", dit_run, *flags])
        assert says in capsys.readouterr().err, flags


#################################################################################
#                                  probe.py                                     #
#################################################################################


def probe_args(**kw):
    args = probe.parse_args([])
    args.epochs, args.warmup_epochs = 30, 3
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def train_linear(x, y, xv, yv, num_classes, args):
    """One linear probe on fixed features (x, y); its accuracy on (xv, yv)."""
    return probe.train_heads(lambda epoch: {0: x}, y, {0: xv}, yv, num_classes, args)[0]


@pytest.mark.parametrize("kw", [dict(protocol="mae"),  # one epoch of Adam needs small batches here
                                dict(protocol="research", probe_batch_size=16, adam_base_lr=0.16)])
def test_probe_finds_planted_linear_structure(kw):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(10, 32, generator=g) * 2
    y, yv = torch.arange(2000) % 10, torch.arange(500) % 10
    x = means[y] + torch.randn(2000, 32, generator=g)
    xv = means[yv] + torch.randn(500, 32, generator=g)
    acc = train_linear(x, y, xv, yv, 10, probe_args(**kw))
    assert acc["top1"] > 90 and acc["top5"] >= acc["top1"]


def test_research_probe_is_adam_at_a_constant_lr(monkeypatch):
    """The authors' probe: Adam at lr = 0.1 x batch / 256 at every step (no warm-up, no decay)."""
    seen = []
    step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self: seen.append(self.param_groups[0]["lr"]) or step(self))
    x, y = torch.randn(400, 8), torch.arange(400) % 4
    train_linear(x, y, x, y, 4, probe_args(protocol="research", epochs=3, probe_batch_size=128))
    assert len(seen) == 9 and all(lr == pytest.approx(0.05) for lr in seen)


def test_research_probe_defaults_are_the_authors_whatever_the_preset(capsys):
    """--protocol research is the authors' probe (`linear_probing/detok.sh`): 1 epoch at a global batch of
    4,096, Adam at 0.1 x batch / 256 without weight decay, under every preset (the paper preset gave it MAE's
    90 epochs at 16,384), an explicit flag still overrides it, and --help shows the values."""
    for preset in sorted(probe.PRESETS):
        args = probe.parse_args(["--preset", preset, "--protocol", "research"])
        assert (args.epochs, args.probe_batch_size, args.adam_base_lr, args.weight_decay) == (1, 4096, 0.1, 0.0)
    assert probe.parse_args(["--protocol", "research", "--epochs", "3"]).epochs == 3
    assert probe.parse_args(["--preset", "paper"]).epochs == 90
    with pytest.raises(SystemExit):
        probe.parse_args(["-h"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "--protocol research: 1 " in shown and "--protocol research: 4096 " in shown


def test_probe_heads_train_on_the_run_device(monkeypatch):
    """The linear heads, their batches and the validation features go to the run's device (a GPU's under
    torchrun), not the CPU: ImageNet's MAE probe is 7,000 steps of batch 16,384, hours on the one thread
    torchrun gives each process. Shown on PyTorch's "meta" device, where a CPU tensor fails to mix."""
    monkeypatch.setattr(probe, "accuracy", lambda head, xv, yv, n: {next(head.parameters()).device, xv.device,
                                                                     yv.device})
    x, y = torch.randn(64, 8), torch.arange(64) % 4
    for protocol in ("mae", "research"):
        args = probe_args(protocol=protocol, epochs=2, warmup_epochs=1)
        seen = probe.train_heads(lambda epoch: {0: x}, y, {0: x}, y, 4, args, torch.device("meta"))
        assert seen == {0: {torch.device("meta")}}


def test_probe_training_views(stage1_run, monkeypatch):
    """research: each epoch takes each image or its flip; mae --augment: fresh crops each epoch; both a
    pure function of (seed, epoch, index). Features are gathered in float32 (every rank holds the whole
    set: in float64, ImageNet's SL features were 7.8 GB per rank)."""
    gathered = []
    monkeypatch.setattr(distill, "gather", lambda blocks: gathered.append(blocks[0].dtype) or torch.cat(blocks))
    model = tokenizer.load_tokenizer(stage1_run)
    data = distill.build_dataset("synthetic", 32, "train", 24)
    args = probe_args(protocol="research", batch_size=8, workers=0, log_every=100)
    features, y = probe.training_features(model, data, "L", [0.0], args, torch.device("cpu"))
    plain, _ = probe.extract(model, data, "L", [0.0], args, torch.device("cpu"))
    flipped, _ = probe.extract(model, probe.View(data, 0, 0, flip=1.0), "L", [0.0], args, torch.device("cpu"))
    assert torch.equal(y, torch.arange(24) % 10)
    for epoch in (0, 1):
        f = features(epoch)[0.0]
        is_plain = (f == plain[0.0]).all(1)
        assert (is_plain | (f == flipped[0.0]).all(1)).all() and 4 < is_plain.sum() < 20
    assert not torch.equal(features(0)[0.0], features(1)[0.0])
    a, b, c = (probe.View(data, 0, e, crop=True) for e in (0, 0, 1))
    assert torch.equal(a[3][0], b[3][0]) and not torch.equal(a[3][0], c[3][0]) and a[3][0].shape == (3, 32, 32)
    assert set(gathered) == {torch.float32, torch.int64}  # features, labels


def test_probe_random_labels_stay_near_chance():
    g = torch.Generator().manual_seed(0)
    x, xv = torch.randn(2000, 32, generator=g), torch.randn(1000, 32, generator=g)
    y, yv = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    acc = train_linear(x, y, xv, yv, 10, probe_args())
    assert 5 < acc["top1"] < 16 and 40 < acc["top5"] < 60


def test_probe_two_processes_equal_one(stage1_run, tmp_path, monkeypatch):
    common = ["--tokenizer", stage1_run, "--num-train", "60", "--num-val", "30", "--batch-size", "16",
              "--epochs", "5", "--warmup-epochs", "1", "--probe-batch-size", "32", "--sweep-tau", "0", "0.5"]
    one = probe.main(common + ["--out", str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
           os.path.join(HERE, "probe.py"), *common, "--out", str(tmp_path / "two")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "two" / "probe.json") as f:
        two = json.load(f)["results"]
    assert [(r["tau"], round(r["top1"], 4)) for r in one] == [(r["tau"], round(r["top1"], 4)) for r in two]
    assert os.path.isfile(tmp_path / "one" / "probe_tau.png")
    written = []
    with monkeypatch.context() as m:
        m.setattr(distill, "atomic_write", lambda path, write: written.append(os.path.basename(path)))
        probe.plot_tau({"one": one}, str(tmp_path / "p.png"))
    assert written == ["p.png"]  # the plot too: a run killed while drawing leaves no truncated PNG
    (tmp_path / "other").mkdir()  # a second, different run to draw beside the first
    (tmp_path / "other" / "probe.json").write_text(json.dumps(
        {"chance": 10.0, "results": [{"tau": r["tau"], "top1": 90 - r["top1"] / 2} for r in one]}))
    probe.main(["plot", str(tmp_path / "one" / "probe.json"), str(tmp_path / "other" / "probe.json"),
                "--out", str(tmp_path / "both")])
    with Image.open(tmp_path / "both" / "probe_tau.png") as plot:
        colours = {plot.getpixel((x, y)) for x in range(plot.width) for y in range(plot.height)}
    assert set(probe.COLOURS[:2]) <= colours  # both runs drawn
    for feature in ("L", "SL"):
        (res,) = probe.main(common[:-3] + ["--feature", feature, "--out", str(tmp_path / feature)])
        assert res["feature"] == feature and 0 <= res["top1"] <= 100
    with monkeypatch.context() as m:  # an unwritable --out fails before any feature is extracted
        m.setattr(probe, "extract", lambda *a: pytest.fail("features extracted before --out was checked"))
        with pytest.raises(OSError, match="cannot write to /proc/rectok_probe"):
            probe.main(common + ["--out", "/proc/rectok_probe"])


def test_probe_bad_inputs(capsys):
    """A flag the run would ignore (--tau without the flow feature, --sweep-tau with SL, --augment or a
    LARS setting in the research protocol, the Adam lr in MAE's, a probe's flag in plot mode), a tau off
    the flow, a warm-up longer than the run, or batches of one feature for MAE's BatchNorm, fails at the
    command line, naming the flag."""
    for flags, says in ((["--tau", "0.5"], "--tau: only with --feature flow"),
                        (["--feature", "SL", "--sweep-tau", "0", "0.5"], "--sweep-tau: only with --feature L or flow"),
                        (["--feature", "flow", "--tau", "1.5"], "--tau [1.5]: "),
                        (["--sweep-tau", "0", "-0.1"], "--tau [0.0, -0.1]: "), (["--sweep-tau"], "--sweep-tau: "),
                        (["--protocol", "research", "--augment"], "--augment: only with --protocol mae"),
                        (["--protocol", "research", "--base-lr", "1"], "--base-lr: only with --protocol mae"),
                        (["--protocol", "research", "--warmup-epochs", "2"], "--warmup-epochs: only with --protocol"),
                        (["--adam-base-lr", "0.3"], "--adam-base-lr: only with --protocol research"),
                        (["plot", "a/probe.json", "--feature", "SL"], "unrecognized arguments: --feature"),
                        (["--warmup-epochs", "5", "--epochs", "3"], "--warmup-epochs 5.0: "),
                        (["--warmup-epochs=-1"], "--warmup-epochs: -1: must be at least 0"),
                        (["--num-train", "1"], "--probe-batch-size: "),  # it failed after extraction
                        (["--probe-batch-size", "1"], "--probe-batch-size: ")):
        with pytest.raises(SystemExit):
            probe.parse_args(flags)
        assert says in capsys.readouterr().err, flags
    assert probe.parse_args(["--feature", "flow", "--tau", "0.5"]).tau == 0.5
    assert probe.parse_args(["--protocol", "research", "--adam-base-lr", "0.3"]).adam_base_lr == 0.3
    assert probe.parse_args(["--protocol", "research", "--num-train", "1"]).num_train == 1  # no BatchNorm there
    assert (probe.parse_args([]).workers, probe.parse_args(["--preset", "paper"]).workers) == (0, distill.IMAGE_WORKERS)


#################################################################################
#                  Checkpoint safety and wrong files (every loader)             #
#################################################################################


class Payload:
    """Pickles as a call of os.system: what a malicious checkpoint carries."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_no_loader_runs_code_from_a_checkpoint(stage1_run, dit_run, cache, tmp_path):
    """A file whose pickle calls os.system is refused by every entry point that reads a file, and its payload
    never runs (torch.load with weights_only=True everywhere)."""
    marker = tmp_path / "payload_ran"
    evil = str(tmp_path / "evil.pt")
    torch.save({"kind": "tokenizer", "config": {}, "model": {}, "ema": {"w": Payload(marker)}, "step": 1,
                "rng": [Payload(marker)], "model_ema": {"w": Payload(marker)}}, evil)
    runs = {name: tmp_path / name for name in ("tok", "dit", "teacher")}
    for folder in runs.values():
        folder.mkdir()
        shutil.copy(evil, folder / "latest.pt")
    entry_points = [
        lambda: tokenizer.load_tokenizer(evil),
        lambda: tokenizer.main(["evaluate", "--ckpt", evil, "--num-eval", "4", "--workers", "0"]),
        lambda: tokenizer.main(encode_args(evil, str(tmp_path / "enc"))),
        lambda: tokenizer.main(["finetune", "--init", evil, "--out", str(tmp_path / "ft"), "--workers", "0"]),
        lambda: tokenizer.main(tok_args(None, str(runs["tok"]))),  # resume
        lambda: dit.load_dit(evil),
        lambda: dit.main(dit_args(cache, str(runs["dit"]))),  # resume
        lambda: dit.main(dit_args(cache, str(tmp_path / "d2"), "--tokenizer", evil, "--preview-every", "5")),
        lambda: distill.main(STANDIN_TINY + ["--out", str(runs["teacher"])]),  # resume
        lambda: distill.build_teacher("standin", evil),
        lambda: distill.read_state_dict(evil),
        lambda: sample.main(sample_args(evil, str(tmp_path / "s1"))),
        lambda: sample.main(sample_args(evil, str(tmp_path / "s2"), "--latent-stats",
                                        os.path.join(cache, "stats.npz"), "--tokenizer", stage1_run)),
        lambda: sample.main(sample_args(dit_run, str(tmp_path / "s3"), "--guide", evil, "--cfg", "1.29")),
        lambda: sample.main(sample_args(dit_run, str(tmp_path / "s4"), "--tokenizer", evil)),
        lambda: probe.main(["--tokenizer", evil, "--num-train", "10", "--num-val", "10", "--out", str(tmp_path / "p")]),
    ]
    for i, call in enumerate(entry_points):
        with pytest.raises(ValueError, match="refused: it holds objects other than tensors"):
            call()
        assert not marker.exists(), f"entry point {i} ran the payload"


def test_divergence_stops_before_anything_is_saved(standin_teacher, cache, tmp_path, monkeypatch):
    """An absurd learning rate: the run stops with a clear message at the first check, before any
    checkpoint, and the last good latest.pt is kept as it was. Weights made nan by a step whose loss was
    finite (a nan gradient) are not saved either: they were, as the loss alone was checked."""
    for main, args, lr in ((tokenizer.main, tok_args(standin_teacher, str(tmp_path / "tok")), "--base-lr"),
                           (dit.main, dit_args(cache, str(tmp_path / "dit")), "--lr")):
        absurd = args[:args.index("--out") + 1] + [str(tmp_path / f"absurd_{lr}")] + args[args.index("--out") + 2:]
        with pytest.raises(FloatingPointError, match="nan or inf at or before step .*wrote no checkpoint. Start a fre"):
            main(absurd + [lr, "1e30", "--log-every", "1000"])
        assert not [f for f in os.listdir(tmp_path / f"absurd_{lr}") if f.endswith(".pt")]
        main(args + ["--stop-at", "1"])
        latest = args[args.index("--out") + 1] + "/latest.pt"
        good = open(latest, "rb").read()
        with monkeypatch.context() as m:  # the step's update leaves a nan in the model after its loss
            m.setattr(distill, "update_ema", lambda ema, model, decay: next(model.parameters()).data.fill_(math.nan))
            with pytest.raises(FloatingPointError, match="weights became nan or inf at or before step 2; .*latest.pt "
                                                         "\\(step 1\\) is kept, but resumed .* diverges again"):
                main(args + ["--stop-at", "2"])
        assert open(latest, "rb").read() == good


def test_a_damaged_latent_cache_is_named_not_the_learning_rate(cache, tmp_path):
    """A nan in the latent cache was reported as a divergence, blamed on the learning rate, with advice to
    resume a "last good latest.pt" that did not exist: the run now names the cache."""
    damaged = str(tmp_path / "cache")
    shutil.copytree(cache, damaged)
    moments = np.load(tokenizer.shard_path(damaged, "moments", 0), mmap_mode="r+")
    moments[:] = np.nan
    moments.flush()
    del moments
    with pytest.raises(FloatingPointError, match=f"training inputs held nan or inf .*{damaged}.*re-encode"):
        dit.main(dit_args(damaged, str(tmp_path / "run"), "--log-every", "1"))


def test_weights_that_are_nan_are_refused_when_loaded(stage1_run, tmp_path):
    """evaluate of a tokenizer whose weights are nan exited 0 with "psnr nan": every weight load refuses
    nan or inf weights, naming the file."""
    ckpt = torch.load(stage1_run, weights_only=True)
    ckpt["ema"] = {k: v.fill_(math.nan) if torch.is_floating_point(v) else v for k, v in ckpt["ema"].items()}
    broken = str(tmp_path / "broken.pt")
    torch.save(ckpt, broken)
    with pytest.raises(ValueError, match=f"tokenizer checkpoint {broken} holds nan or inf weights"):
        tokenizer.main(["evaluate", "--ckpt", broken, "--num-eval", "8", "--out", str(tmp_path / "eval")])


def test_tokenizer_logs_and_watches_the_mean_over_micro_batches(standin_teacher, tmp_path, monkeypatch, capsys):
    """With --grad-accum the logged and watched loss is the step's mean over its micro-batches. It was the
    last micro-batch's alone: a nan in an earlier one went unseen, and its weights were saved."""
    totals, real = [], tokenizer.TokenizerLoss.generator_loss

    def recorded(self, *a):
        total, terms = real(self, *a)
        totals.append(total.item())
        return (total * math.nan if poison and len(totals) == 1 else total), terms

    monkeypatch.setattr(tokenizer.TokenizerLoss, "generator_loss", recorded)
    args = tok_args(standin_teacher, str(tmp_path / "run"), "--grad-accum", "2", "--stop-at", "1", "--log-every", "1")
    poison = False
    tokenizer.main(args)
    logged = float(re.search(r" total (\S+)", capsys.readouterr().out).group(1))
    assert len(totals) == 2 and abs(totals[0] - totals[1]) > 1e-3
    assert logged == pytest.approx(sum(totals) / 2, abs=1e-4)
    poison, totals[:] = True, []
    with pytest.raises(FloatingPointError, match="the loss became nan or inf at or before step 1"):
        tokenizer.main(tok_args(standin_teacher, str(tmp_path / "nan"), "--grad-accum", "2", "--stop-at", "1"))
    assert not os.path.exists(tmp_path / "nan" / "latest.pt")


def test_wrong_or_damaged_checkpoints_say_what_they_are(stage1_run, dit_run, standin_teacher, tmp_path):
    with pytest.raises(ValueError, match="is a generator checkpoint; expected a tokenizer checkpoint"):
        tokenizer.load_tokenizer(dit_run)
    with pytest.raises(ValueError, match="is a tokenizer checkpoint; expected a generator checkpoint"):
        dit.load_dit(stage1_run)
    with pytest.raises(ValueError, match="is a teacher checkpoint; expected a tokenizer checkpoint"):
        tokenizer.load_tokenizer(standin_teacher)
    with pytest.raises(ValueError, match="is a tokenizer checkpoint; expected a stand-in teacher"):
        distill.build_teacher("standin", stage1_run)
    empty, cut = tmp_path / "empty.pt", tmp_path / "cut.pt"
    empty.write_bytes(b"")
    cut.write_bytes(open(stage1_run, "rb").read()[:5000])
    for path in (empty, cut):
        with pytest.raises(ValueError, match=f"{path} is damaged or not a PyTorch checkpoint"):
            tokenizer.load_tokenizer(str(path))
    _, w = parity("ditdh_forward")  # the authors' generator layout is not a tokenizer
    torch.save({"model_ema": w}, tmp_path / "DiTDDT.pth")
    with pytest.raises(ValueError, match="not a tokenizer checkpoint"):
        tokenizer.load_tokenizer(str(tmp_path / "DiTDDT.pth"))
    _, w = parity("tokenizer_full_reconstruct")  # nor is the authors' tokenizer a generator
    torch.save({"model_ema": w}, tmp_path / "RecTok.pth")
    with pytest.raises(ValueError, match="not a DiT\\^DH checkpoint"):
        dit.load_dit(str(tmp_path / "RecTok.pth"))


#################################################################################
#                        The whole pipeline, end to end                         #
#################################################################################


def test_sampling_from_released_layout(dit_run, cache, tmp_path):
    """Authors'-layout generators ({'model_ema'} without RoPE buffers) sample with --latent-stats."""
    ckpt = torch.load(dit_run, weights_only=True)
    ema = {k: v for k, v in ckpt["ema"].items() if not k.endswith(("freqs_cos", "freqs_sin"))}
    torch.save({"model_ema": ema}, tmp_path / "DiTDDT.pth")
    ours, theirs = str(tmp_path / "ours"), str(tmp_path / "theirs")
    sample.main(sample_args(dit_run, ours))
    sample.main(sample_args(str(tmp_path / "DiTDDT.pth"), theirs, "--latent-stats",
                            os.path.join(cache, "stats.npz"), "--tokenizer", ckpt["latents"]["tokenizer"]))
    sample.main(sample_args(dit_run, str(tmp_path / "ours_stats"), "--latent-stats",
                            os.path.join(cache, "stats.npz")))
    a, b, c = (np.load(os.path.join(x, "samples.npz"))["arr_0"] for x in (ours, theirs, str(tmp_path / "ours_stats")))
    assert np.array_equal(a, b)
    assert np.array_equal(a, c)  # one of our checkpoints with --latent-stats: still its EMA weights
    with pytest.raises(ValueError, match="--tokenizer"):
        sample.main(sample_args(str(tmp_path / "DiTDDT.pth"), theirs, "--latent-stats",
                                os.path.join(cache, "stats.npz")))
    last = max(int(k.split(".")[1]) for k in ema if k.startswith("blocks."))
    _, w = parity("ditdh_forward")  # widths of no size: it was a KeyError
    with pytest.raises(ValueError, match="head counts are not in the weights; load it with .*heads="):
        dit.official_config(w)
    with pytest.raises(ValueError, match="trunk depth is not in the weights"):  # equal widths, no known size
        dit.official_config({k: v for k, v in ema.items() if not k.startswith(f"blocks.{last}.")})


def test_pipeline_end_to_end(tmp_path, monkeypatch):
    """distill -> tokenizer -> finetune -> evaluate -> encode -> dit -> sample -> probe at tiny settings,
    each stage reading the previous one's default output (as `python FILE.py` does)."""
    monkeypatch.chdir(tmp_path)
    quick = ["--workers", "0", "--log-every", "4"]
    distill.main(["--epochs", "1", "--num-train", "256", "--num-val", "64", *quick])
    tokenizer.main(["--epochs", "1", "--num-train", "256", "--batch-size", "32", "--grid-every", "4", *quick])
    tokenizer.main(["finetune", "--epochs", "1", "--num-train", "128", "--batch-size", "32", *quick])
    metrics = tokenizer.main(["evaluate", "--num-eval", "32", "--batch-size", "16", "--workers", "0"])
    tokenizer.main(["encode", "--num-train", "128", "--batch-size", "32", "--workers", "0"])
    dit.main(["--epochs", "1", "--batch-size", "16", *quick])
    sample.main(["--num-images", "20", "--steps", "10", "--batch-size", "10"])
    results = probe.main(["--num-train", "200", "--num-val", "100", "--epochs", "10", "--warmup-epochs", "1",
                          "--sweep-tau", "0", "0.3", "0.7"])
    runs = tmp_path / "runs"
    for path in ("teacher/teacher.pt", "tokenizer/latest.pt", "tokenizer/recon_0000004.png",
                 "tokenizer_ft/latest.pt", "tokenizer_ft/metrics_synthetic.json", "tokenizer_ft/eval_synthetic_ema.png",
                 "latents/stats.npz", "latents/meta.json", "dit/latest.pt", "dit/preview_0000008.png",
                 "samples/samples.npz", "samples/preview.png", "probe/probe.json", "probe/probe_tau.png"):
        assert (runs / path).is_file(), path
    assert read_cache_array(str(runs / "latents"), "moments").shape == (128, 64, 32)
    assert np.load(runs / "samples" / "samples.npz")["arr_0"].shape == (20, 32, 32, 3)
    assert all(np.isfinite(m["psnr"]) for m in metrics.values())
    assert [r["tau"] for r in results] == [0, 0.3, 0.7] and all(0 <= r["top1"] <= 100 for r in results)


#################################################################################
#          Your own images and weights: folders, reconstructions, URLs          #
#################################################################################


def photo_folder(root, files, size=(36, 44)):
    """Images at the given relative paths (format from the extension), each of its own colour noise."""
    for k, name in enumerate(files):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return str(root)


def test_one_folder_reader_for_every_stage_and_fid(tmp_path, inception_files, capsys):
    """Class folders are read at any depth with every image extension in any case (a GIF too); what is
    left out is said; fid.py lists the same files; an empty class is refused; fid.py reads 16-bit, palette,
    alpha, greyscale and CMYK files as 8-bit RGB, as the trainers do, and records each source's count."""
    names = ["cat/a.JPG", "cat/deep/b.png", "cat/deep/er/c.gif", "dog/d.TIFF", "dog/e.webp", "dog/f.jpeg"]
    root = photo_folder(tmp_path / "data", names)
    (tmp_path / "data" / "dog" / "notes.txt").write_text("not an image")
    data = distill.ImageFolder(root, 32)
    assert len(data) == 6 and data.classes == ["cat", "dog"] and distill.labels_of(data) == [0, 0, 0, 1, 1, 1]
    assert f"{root}: 6 images in 2 classes; skipped 1 files that are not images (.txt 1)" in capsys.readouterr().out
    assert sorted(fid.list_images(root)[0]) == sorted(path for path, _ in data.samples)
    (tmp_path / "data" / "empty").mkdir()
    with pytest.raises(ValueError, match="1 of 3 class folders hold no images .*empty"):
        distill.ImageFolder(root, 32)
    modes = tmp_path / "modes"
    modes.mkdir()
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(modes / "deep.png")
    grey = Image.fromarray(np.full((16, 16), 128, np.uint8))
    grey.convert("P").save(modes / "palette.gif")
    grey.convert("RGBA").save(modes / "alpha.png")
    grey.convert("LA").save(modes / "grey_alpha.png")
    grey.convert("CMYK").save(modes / "cmyk.tif")
    for path in sorted(modes.iterdir()):
        image = fid.read_image(str(path))
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16), path.name
        assert abs(image.float().mean().item() - 128) < 2, path.name  # mid-grey, not clipped to white
    weights = ["--inception-weights", str(inception_files / "inception.pth"), "--batch-size", "4"]
    m = fid.main([str(modes), str(inception_files / "b.npz"), "--json", str(tmp_path / "m.json"), *weights])
    assert m["num_images"] == {str(modes): 5, str(inception_files / "b.npz"): 7}
    assert json.loads((tmp_path / "m.json").read_text())["num_images"][str(modes)] == 5


def test_reconstruct_writes_each_image_under_its_name(stage1_run, tmp_path):
    """`tokenizer.py reconstruct`: a PNG per image at the same relative path, psnr.csv with each image's
    PSNR (the API's reconstruction of its crop) and their mean, the same on 2 processes as on 1."""
    root = photo_folder(tmp_path / "photos", ["a.JPG", "trip/b.png", "trip/day 2/c.gif"])
    common = ["--ckpt", stage1_run, "--data", root, "--batch-size", "2", "--workers", "0"]
    with pytest.raises(SystemExit) as help_:  # the mode's help, whatever it needs to run
        tokenizer.parse_args(["reconstruct", "-h"])
    assert help_.value.code == 0
    with pytest.raises(SystemExit) as missing:
        tokenizer.parse_args(["reconstruct"])
    assert missing.value.code == 2
    tokenizer.main(["reconstruct", *common, "--out", str(tmp_path / "one")])
    torchrun("tokenizer.py", ["reconstruct", *common, "--out", str(tmp_path / "two")])
    names = ["a.png", "trip/b.png", "trip/day 2/c.png"]
    rows = [line.split(",") for line in (tmp_path / "one" / "psnr.csv").read_text().splitlines()]
    assert rows[0] == ["image", "psnr"] and [r[0] for r in rows[1:-1]] == names and rows[-1][0] == "mean"
    assert float(rows[-1][1]) == pytest.approx(np.mean([float(r[1]) for r in rows[1:-1]]), abs=1e-3)
    assert (tmp_path / "two" / "psnr.csv").read_text() == (tmp_path / "one" / "psnr.csv").read_text()
    tok = tokenizer.load_tokenizer(stage1_run)
    crop = torch.tensor(distill.center_crop_adm(fid.load_rgb(os.path.join(root, "trip/b.png")), 32))
    x = crop.permute(2, 0, 1)[None]
    with torch.no_grad():
        recon = tok.decode(tok.encode(x))
    assert float(rows[2][1]) == pytest.approx(tokenizer.psnr(recon, x.float() / 127.5 - 1).item(), abs=1e-3)
    for name in names:
        for run in ("one", "two"):
            with Image.open(tmp_path / run / name) as im:
                assert im.size == (32, 32)
    expected = (recon[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(Image.open(tmp_path / "one" / "trip/b.png")).astype(int) - expected).max() <= 1


def test_probe_holds_out_a_disjoint_split(stage1_run, tmp_path, monkeypatch):
    """probe.py --data DIR without --val-data validates on every 50th image, never on a training image."""
    root = photo_folder(tmp_path / "data", [f"{c}/{i}.png" for c in "ab" for i in range(60)], size=(32, 32))
    splits = []
    train_val = distill.train_val
    monkeypatch.setattr(distill, "train_val", lambda *a, **k: splits.append(train_val(*a, **k)) or splits[-1])
    probe.main(["--tokenizer", stage1_run, "--data", root, "--num-train", "40", "--epochs", "1", "--warmup-epochs", "0",
                "--workers", "0", "--out", str(tmp_path / "probe")])
    train, val = (set(distill.image_files(d)[0]) for d in splits[0])
    assert len(val) == 3 and len(train) == 40 and not train & val


def test_standin_teacher_must_have_trained_on_the_data(standin_teacher, tmp_path):
    """The quick start's stand-in teacher (built-in shapes) is refused for a folder, with the command that
    trains one on it."""
    root = photo_folder(tmp_path / "data", ["a/0.png", "b/1.png"], size=(32, 32))
    with pytest.raises(ValueError, match=f"trained on synthetic, not on --data {root}: .*python distill.py --data"):
        tokenizer.main(tok_args(standin_teacher, str(tmp_path / "tok"), "--data", root))


def test_cache_names_its_files_and_resumes_only_over_them(stage1_run, tmp_path):
    """files.txt names each latent's image and class; an encode into the cache after the images changed
    under the same names is refused; the same files resume."""
    root = photo_folder(tmp_path / "data", ["a/0.png", "a/x/1.png", "b/2.png"], size=(32, 32))
    out = str(tmp_path / "cache")
    args = ["encode", "--ckpt", stage1_run, "--data", root, "--out", out, "--workers", "0"]
    tokenizer.main(args)
    assert (tmp_path / "cache" / "files.txt").read_text() == "a\ta/0.png\na\ta/x/1.png\nb\tb/2.png\n"
    tokenizer.main(args)  # the same files: a finished cache, nothing to do
    photo_folder(tmp_path / "data", ["b/2.png"], size=(30, 30))  # a new image under an old name
    with pytest.raises(ValueError, match="files: cache has .*encode into a fresh --out"):
        tokenizer.main(args)


def test_bad_files_never_cost_a_run(tmp_path, stage1_run):
    """A file whose header reads but whose body does not: without --skip-bad-images the error names it and
    the flag; with it, encode finishes (the image is label -1, left out of the reader and the statistics)
    and a training run goes on."""
    root = photo_folder(tmp_path / "data", [f"{c}/{i}.png" for c in "ab" for i in range(8)], size=(32, 32))
    bad = tmp_path / "data" / "a" / "3.png"
    bad.write_bytes(bad.read_bytes()[:80])
    out = str(tmp_path / "cache")
    with pytest.raises(RuntimeError, match="cannot read image .*3.png.*--skip-bad-images"):
        tokenizer.main(["encode", "--ckpt", stage1_run, "--data", root, "--out", out, "--workers", "0"])
    tokenizer.main(["encode", "--ckpt", stage1_run, "--data", root, "--out", str(tmp_path / "c2"), "--workers", "0",
                    "--skip-bad-images", "--batch-size", "4"])
    labels = read_cache_array(str(tmp_path / "c2"), "labels")
    assert labels.tolist() == [0] * 3 + [-1] + [0] * 4 + [1] * 8
    cache = tokenizer.LatentCache(str(tmp_path / "c2"), flip=False)
    assert len(cache) == 15 and [cache[i][1] for i in range(15)] == [0] * 7 + [1] * 8
    moments = torch.stack([cache[i][0] for i in range(15)])[..., :8].double()
    assert_close(torch.from_numpy(np.load(os.path.join(tmp_path / "c2", "stats.npz"))["mean"]).double(),
                 moments.mean(dim=(0, 1)))
    tokenizer.main(tok_args(None, str(tmp_path / "tok"), "--data", root, "--skip-bad-images", "--batch-size", "4"))
    assert torch.load(tmp_path / "tok" / "latest.pt", weights_only=True)["step"] == 4  # 15 images, drop_last


def test_weight_flags_take_urls(stage1_run, dit_run, standin_teacher, tmp_path, monkeypatch):
    """Every weight flag takes a URL, downloaded once into torch.hub's cache ($TORCH_HOME); a file already
    there is used offline; a download that fails says where the file is expected."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    url = (tmp_path / "RecTok_mine.pth").as_uri()
    shutil.copy(stage1_run, tmp_path / "RecTok_mine.pth")
    results = tokenizer.main(["evaluate", "--ckpt", url, "--num-eval", "4", "--workers", "0",
                              "--out", str(tmp_path / "eval")])
    cached = tmp_path / "home" / "hub" / "checkpoints" / "RecTok_mine.pth"
    assert cached.is_file() and np.isfinite(results["ema"]["psnr"])
    shutil.copy(dit_run, cached.parent / "DiT_mine.pt")  # offline: the cache is filled beforehand
    sample.main(["--dit", "https://example.invalid/hub/DiT_mine.pt", "--tokenizer", url, "--out",
                 str(tmp_path / "samples"), "--num-images", "2", "--steps", "2", "--batch-size", "2"])
    assert (tmp_path / "samples" / "samples.npz").is_file()
    with pytest.raises(RuntimeError, match="could not download .*missing.pt.*place the file at .*checkpoints"):
        dit.load_dit((tmp_path / "missing.pt").as_uri())
    teacher = distill.build_teacher("standin", pathlib.Path(standin_teacher).as_uri(), grid=4)  # --teacher-weights
    assert teacher.data == "synthetic" and (tmp_path / "home" / "hub" / "checkpoints" / "teacher.pt").is_file()


def test_the_readmes_paper_to_code_map_names_real_code():
    """Every function or class the README's map of the paper names exists in the file it names."""
    text = open(os.path.join(HERE, "README.md")).read()
    table = text[text.index("## The paper in the code"):text.index("## From Python")]
    rows = [row.split("|")[2:4] for row in table.splitlines() if row.startswith("| ") and ".py`" in row]
    assert len(rows) >= 14
    for file, names in rows:
        module = {"tokenizer": tokenizer, "dit": dit, "distill": distill, "fid": fid, "probe": probe}[
            file.strip(" `")[:-3]]
        for name in re.findall(r"`([\w.]+)`", names):
            owner = module
            for part in name.split("."):
                assert hasattr(owner, part), f"{file.strip()} has no {name}"
                owner = getattr(owner, part)


def test_the_map_names_every_test():
    """The map at the top of this file stays true: it names every test (directly or by a pattern), and each
    name or pattern in it is a test of this file."""
    names = re.findall(r"\btest_[\w*]+", __doc__.split("Map,")[1].split("Layout:")[0])
    tests = [name for name in globals() if name.startswith("test_")]
    assert [n for n in names if not fnmatch.filter(tests, n)] == [], "names in the map that are no test"
    assert [t for t in tests if not any(fnmatch.fnmatch(t, n) for n in names)] == [], "tests the map leaves out"
