"""build-engine: option checks, the TensorRT build plan (TensorRT 10 vs 11, DLA, compatibility),
engine names, the missing-TensorRT path, ONNX Runtime artifacts (file names, sidecars, the
TensorRT provider's options), and the command line; TensorRT builds on the TensorRT API emulator
(a test double: TensorRT itself is not run)."""

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from rich.console import Console
from scan_deploy.engines.build import (
    BuildOptions,
    build_engines,
    check_shape_options,
    make_plan,
    network_flags,
    session_providers,
    tensorrt_ep_options,
    tensorrt_stem,
)
from scan_deploy.engines.cuda_device import DeviceInfo, cpu_device
from scan_deploy.engines.profiles import InputRange, Profile
from scan_deploy.runtime.backends import open_backend
from typer.testing import CliRunner

from scan_deploy import cli
from scan_deploy.bundle import Bundle, load_bundle
from scan_deploy.choices import Backend, Graph, Precision, Provider
from scan_deploy.errors import UserError

from ..export.tiny_bundle import add_variant, make_bundle
from ..runtime.tensorrt_emulator import VERSIONS, emulated_tensorrt

SHA = {"fp32": "1" * 64, "fp16": "2" * 64, "int8": "3" * 64}
TEXT_INPUTS = [
    {"name": "tokens", "dtype": "int64", "shape": ["batch", "words"]},
    {"name": "lengths", "dtype": "int64", "shape": ["batch"]},
]


def _manifest_bundle(tmp_path) -> Bundle:
    """A bundle as the plan sees it (no files needed): graphs, fp16/int8 variants, ranges."""

    def graphs(precision):
        suffix = "" if precision == "fp32" else f".{precision}"
        return {
            g: {"file": f"{g}{suffix}.onnx", "sha256": SHA[precision], "inputs": TEXT_INPUTS}
            for g in Graph
        }

    manifest = {
        "graphs": graphs("fp32"),
        "variants": {p: {"graphs": graphs(p)} for p in ("fp16", "int8")},
        "shape_ranges": {
            "batch": {"min": 1, "opt": 32, "max": 64},
            "regions": {"min": 36, "opt": 36, "max": 36},
            "words": {"min": 1, "opt": 16, "max": 64},
        },
        "vocab": {"words_sha256": "0" * 64},
    }
    return Bundle(tmp_path, manifest, None, None)


@pytest.mark.parametrize(
    ("version", "flags"), [("10.3.0", ("STRONGLY_TYPED",)), ("10.16.1", ("STRONGLY_TYPED",))]
)
def test_tensorrt_10_builds_strongly_typed_networks_by_flag(version, flags):
    assert network_flags(version) == flags


@pytest.mark.parametrize("version", ["11.0.0", "11.4.1"])
def test_tensorrt_11_is_always_strongly_typed_and_takes_no_flag(version):
    assert network_flags(version) == ()


def test_tensorrt_8_is_refused():
    with pytest.raises(UserError, match="TensorRT 8.6.1 is too old: .*TensorRT 10 or newer"):
        network_flags("8.6.1")


def test_default_plan(tmp_path):
    bundle = _manifest_bundle(tmp_path)
    plan = make_plan(bundle, "text_encoder", BuildOptions(), "10.3.0")
    assert plan.source == tmp_path / "text_encoder.onnx" and plan.source_sha256 == SHA["fp32"]
    assert plan.network_flags == ("STRONGLY_TYPED",)
    assert plan.builder_flags == ()  # never FP16/INT8: precision is in the graph
    assert plan.default_device == "GPU" and plan.dla_core is None
    assert plan.workspace_bytes is None and plan.hardware_compatibility_level is None
    assert plan.profiling_verbosity is None  # TensorRT's default
    (profile,) = plan.profiles
    assert profile.inputs["tokens"] == InputRange((1, 1), (32, 16), (64, 64))
    assert profile.inputs["lengths"] == InputRange((1,), (32,), (64,))


def test_plan_options_map_to_tensorrt_settings(tmp_path):
    bundle = _manifest_bundle(tmp_path)
    options = BuildOptions(
        precision="int8",
        workspace_mib=256,
        hardware_compat=True,
        version_compatible=True,
        exclude_lean_runtime=True,
        timing_cache=tmp_path / "timing.cache",
        opt_shapes=("tokens:4x12,lengths:4",),
    )
    plan = make_plan(bundle, "scorer", options, "11.4.1")
    assert plan.source == tmp_path / "scorer.int8.onnx" and plan.source_sha256 == SHA["int8"]
    assert plan.network_flags == ()
    assert plan.builder_flags == ("VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME")
    assert plan.workspace_bytes == 256 << 20
    assert plan.hardware_compatibility_level == "AMPERE_PLUS"
    assert plan.timing_cache == tmp_path / "timing.cache"
    assert plan.profiles[0].inputs["tokens"] == InputRange((4, 12), (4, 12), (4, 12))


def test_dla_plan_is_static_with_gpu_fallback(tmp_path):
    bundle = _manifest_bundle(tmp_path)
    plan = make_plan(bundle, "image_encoder", BuildOptions(precision="fp16", dla_core=1), "10.3.0")
    assert plan.default_device == "DLA" and plan.dla_core == 1
    assert plan.builder_flags == ("GPU_FALLBACK",)
    assert plan.profiling_verbosity == "DETAILED"  # the inspector then reports layer types
    (profile,) = plan.profiles
    assert all(r.min == r.opt == r.max for r in profile.inputs.values())
    assert profile.inputs["tokens"].opt == (32, 16)


def test_shape_options_shared_by_several_graphs_apply_per_graph(tmp_path):
    bundle = _manifest_bundle(tmp_path)
    bundle.manifest["graphs"]["scorer"]["inputs"] = [
        {"name": "words", "dtype": "float32", "shape": ["captions", "words", 8]}
    ]
    options = BuildOptions(opt_shapes=("tokens:4x7,words:2x5x8",))
    check_shape_options(bundle, options)
    text = make_plan(bundle, "text_encoder", options, "10.3.0").profiles[0]
    scorer = make_plan(bundle, "scorer", options, "10.3.0").profiles[0]
    assert text.inputs["tokens"] == InputRange((4, 7), (4, 7), (4, 7))
    assert scorer.inputs["words"] == InputRange((2, 5, 8), (2, 5, 8), (2, 5, 8))
    with pytest.raises(UserError, match=r"max_shapes: unknown input 'images' \(inputs of"):
        check_shape_options(bundle, BuildOptions(max_shapes=("images:4x5",)))


def test_engine_names_carry_version_device_target_and_graph_hash(tmp_path):
    bundle = _manifest_bundle(tmp_path)
    orin = DeviceInfo("Orin", "8.7")
    plan = make_plan(bundle, "scorer", BuildOptions(precision="fp16"), "10.3.0.26")
    assert tensorrt_stem(plan, "10.3.0.26", orin) == "scorer.fp16.trt10.3.0.sm87.gpu.222222222222"
    plan = make_plan(bundle, "scorer", BuildOptions(precision="fp16", dla_core=0), "10.3.0")
    assert tensorrt_stem(plan, "10.3.0", orin) == "scorer.fp16.trt10.3.0.sm87.dla0.222222222222"
    options = BuildOptions(hardware_compat=True, version_compatible=True)
    plan = make_plan(bundle, "scorer", options, "11.4.1")
    assert (
        tensorrt_stem(plan, "11.4.1", DeviceInfo("H200", "9.0"))
        == "scorer.fp32.trt11.4.1vc.ampere_plus.gpu.111111111111"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "tflite"}, r"^backend: got 'tflite', expected one of tensorrt, onnxruntime$"),
        ({"backend": "torch"}, r"^backend: got 'torch', expected one of tensorrt, onnxruntime$"),
        ({"precision": "bf16"}, r"^precision: got 'bf16', expected one of fp32, fp16, int8$"),
        ({"graphs": ("decoder",)}, r"^graphs: got 'decoder', expected one of image_encoder"),
        ({"graphs": ()}, r"^graphs: expected one or more of image_encoder, text_encoder, scorer$"),
        ({"graphs": ("scorer", "text_encoder", "scorer")}, r"^graphs: scorer is given twice$"),
        ({"provider": "cuda"}, r"^provider: applies to backend onnxruntime$"),
        ({"provider": "rocm", "backend": "onnxruntime"}, r"^provider: got 'rocm'"),
        ({"backend": "onnxruntime", "dla_core": 0}, r"^dla_core: applies to backend tensorrt$"),
        (
            {"backend": "onnxruntime", "min_shapes": ("tokens:1x1",)},
            r"^min_shapes: applies to backend tensorrt or provider tensorrt$",
        ),
        ({"dla_core": 0}, r"^dla_core: DLA runs FP16 and INT8 only"),
        ({"exclude_lean_runtime": True}, r"^exclude_lean_runtime: applies with version_compat"),
        ({"workspace_mib": 0}, r"^workspace_mib: expected a size in MiB >= 1"),
    ],
)
def test_option_mistakes_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        BuildOptions(**kwargs)


def test_cli_args_record_the_options():
    options = BuildOptions(
        precision="fp16",
        min_shapes=("tokens:1x1",),
        opt_shapes=("tokens:4x4",),
        max_shapes=("tokens:8x8",),
        workspace_mib=64,
        timing_cache=Path("t.cache"),
        dla_core=0,
        version_compatible=True,
    )
    assert options.cli_args() == [
        "--min-shapes",
        "tokens:1x1",
        "--opt-shapes",
        "tokens:4x4",
        "--max-shapes",
        "tokens:8x8",
        "--workspace",
        "64",
        "--timing-cache",
        "t.cache",
        "--dla-core",
        "0",
        "--version-compatible",
    ]
    assert BuildOptions(backend="onnxruntime").cli_args() == ["--provider", "cpu"]


def test_missing_tensorrt_writes_nothing(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    cache = tmp_path / "timing.cache"
    with pytest.raises(UserError, match="TensorRT is not installed: .*pip install tensorrt"):
        build_engines(load_bundle(tiny), BuildOptions(timing_cache=cache))
    assert not (tiny / "engines").exists() and not cache.exists()


def test_shape_mistakes_fail_before_any_backend_is_needed(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    options = BuildOptions(graphs=("text_encoder",), opt_shapes=("captions:4x7",))
    with pytest.raises(UserError, match="opt_shapes: unknown input 'captions'"):
        build_engines(load_bundle(tiny), options)


def _main(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["scan-deploy", "build-engine", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli.main()
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--min-shapes", "tokens:1y1"], "min_shapes: tokens: dims must be integers"),
        (["--graph", "scorer", "--opt-shapes", "images:4x5x8"], "unknown input 'images'"),
        (["--precision", "fp16"], "the bundle has no fp16 graphs (run: scan-deploy calibrate"),
        ([], "TensorRT is not installed"),
        (["--backend", "onnxruntime", "--provider", "cuda"], "pip install onnxruntime-gpu"),
        (
            ["--backend", "onnxruntime", "--graph", "scorer", "--graph", "scorer"],
            "graphs: scorer is given twice",
        ),
    ],
)
def test_cli_user_mistakes_exit_2_with_one_line(tiny, monkeypatch, capsys, args, message):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: ["CPUExecutionProvider"])
    code, err = _main(monkeypatch, capsys, tiny, *args)
    assert code == 2
    assert message in err and err.startswith("error:")
    assert len(err.strip().splitlines()) == 1
    assert not (tiny / "engines").exists()


def test_cli_builds_onnxruntime_engines(tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    add_variant(bundle, "fp16")
    runner = CliRunner()
    args = ["build-engine", str(bundle), "--backend", "onnxruntime", "--precision", "fp16"]
    result = runner.invoke(cli.app, [*args, "--graph", "scorer", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["graph"] == "scorer" and row["precision"] == "fp16"
    assert row["backend"] == "onnxruntime" and row["provider"] == "cpu"
    assert Path(row["file"]).name.startswith("scorer.fp16.ort")
    assert Path(row["sidecar"]).is_file() and row["size"] == Path(row["file"]).stat().st_size
    table = runner.invoke(cli.app, args)
    assert table.exit_code == 0, table.output
    for text in ("image_encoder", "text_encoder", "scorer", "dynamic (ONNX Runtime)"):
        assert text in table.stdout
    assert len(list((bundle / "engines").glob("*.fp16.*.onnx"))) == 3


def test_cli_spinner_goes_to_stderr_so_json_stdout_stays_clean(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "bundle")
    terminals = {name: io.StringIO() for name in ("console", "err_console")}
    for name, file in terminals.items():  # terminals, so the spinner does draw
        monkeypatch.setattr(cli, name, Console(file=file, force_terminal=True))
    args = ["build-engine", str(bundle), "--backend", "onnxruntime", "--graph", "scorer", "--json"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["graph"] == "scorer"
    assert terminals["console"].getvalue() == ""
    assert terminals["err_console"].getvalue() != ""


def test_backends_and_providers_are_defined_once():
    from scan_deploy.engines import build, ort_providers, sidecar

    assert build.BACKENDS is sidecar.BACKENDS
    assert build.EXECUTION_PROVIDERS is ort_providers.EXECUTION_PROVIDERS
    assert not hasattr(build, "PROVIDERS")
    assert set(build.EXECUTION_PROVIDERS) == set(Provider)
    options = BuildOptions(backend="onnxruntime", precision="fp16", graphs=("scorer",))
    assert (options.backend, options.precision, options.graphs, options.provider) == (
        Backend.ONNXRUNTIME,
        Precision.FP16,
        (Graph.SCORER,),
        Provider.CPU,
    )
    assert all(isinstance(p, Precision) for p in (options.precision, BuildOptions().precision))


# --- On the TensorRT API emulator (tests/emulators: a test double, TensorRT itself not run) ---


@pytest.mark.parametrize("version", VERSIONS)
def test_cli_builds_tensorrt_engines(tiny, tmp_path, version):
    bundle = shutil.copytree(tiny, tmp_path / "bundle")
    cache = tmp_path / "timing.cache"
    args = ["build-engine", str(bundle), "--timing-cache", str(cache), "--json"]
    with emulated_tensorrt(version) as trt:
        result = CliRunner().invoke(cli.app, args)
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout)
        assert [row["graph"] for row in rows] == list(Graph)
        sidecar = json.loads(Path(rows[0]["sidecar"]).read_text())
        major = version.split(".")[0]
        assert sidecar["build"]["network_flags"] == (["STRONGLY_TYPED"] if major == "10" else [])
        assert sidecar["build"]["builder_flags"] == []  # precision is the graph's
        assert sidecar["backend_version"] == trt.__version__
        assert sidecar["device"]["compute_capability"] == "9.0"
        assert Path(rows[0]["file"]).name.startswith(
            f"image_encoder.fp32.trt{trt.__version__}.sm90"
        )
        assert cache.stat().st_size > 0
        again = CliRunner().invoke(cli.app, args)  # the timing cache is read back
        assert again.exit_code == 0, again.output


def test_a_timing_cache_from_another_device_is_refused(tiny, tmp_path, monkeypatch, capsys):
    bundle = shutil.copytree(tiny, tmp_path / "bundle")
    cache = tmp_path / "timing.cache"
    with emulated_tensorrt("10.3", compute_capability="8.7"):
        build_engines(load_bundle(bundle), BuildOptions(graphs=("scorer",), timing_cache=cache))
    with emulated_tensorrt("10.3", compute_capability="9.0"):
        code, err = _main(monkeypatch, capsys, bundle, "--timing-cache", cache)
    assert code == 2 and err.count("\n") == 1
    assert f"{cache}: the timing cache is from another device or TensorRT version" in err
    assert len(list((bundle / "engines").glob("*.engine"))) == 1  # only the first build's


def test_hardware_compatible_engines_run_on_another_ampere_gpu(tiny, tmp_path):
    bundle = shutil.copytree(tiny, tmp_path / "bundle")
    with emulated_tensorrt("10.16", compute_capability="8.7"):
        build_engines(load_bundle(bundle), BuildOptions(hardware_compat=True))
    with emulated_tensorrt("10.16", compute_capability="9.0"):
        backend = open_backend(load_bundle(bundle), "tensorrt")
        regions, _, _ = backend.runner("image_encoder").run(
            {"features": np.ones((2, 5, 10), np.float32)}
        )
    assert regions.shape == (2, 5, 8)


def test_files_names_and_sidecar(built):
    bundle, rows = built
    row = rows["scorer"]
    engine = Path(row["file"])
    assert engine.parent == bundle.path / "engines"
    version = ".".join(ort.__version__.split(".")[:3])
    sha12 = bundle.manifest["graphs"]["scorer"]["sha256"][:12]
    assert engine.name.startswith(f"scorer.fp32.ort{version}.")
    assert engine.name.endswith(f".cpu.{sha12}.onnx")
    sidecar = json.loads(engine.with_suffix(".json").read_text())
    assert sidecar["backend"] == "onnxruntime" and sidecar["provider"] == "cpu"
    assert sidecar["backend_version"] == ort.__version__
    assert sidecar["device"]["name"] == cpu_device().name
    assert sidecar["device"]["compute_capability"] is None
    assert sidecar["source"] == {
        "file": "scorer.onnx",
        "sha256": bundle.manifest["graphs"]["scorer"]["sha256"],
    }
    assert sidecar["vocab"]["words_sha256"] == bundle.vocab.sha256()
    assert sidecar["engine"]["size"] == engine.stat().st_size == row["size"]
    assert sidecar["build"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert sidecar["build"]["session"]["providers"] == [["CPUExecutionProvider", {}]]
    assert sidecar["profiles"] == []
    # nothing else is left in engines/: three models, three sidecars, no staging folder
    names = sorted(p.name for p in (bundle.path / "engines").iterdir())
    assert len(names) == 6 and not any(n.startswith(".") for n in names)


def test_tensorrt_provider_options_keep_the_graph_precision():
    profile = Profile(
        {
            "tokens": InputRange((1, 1), (8, 7), (8, 7)),
            "lengths": InputRange((1,), (8,), (8,)),
        }
    )
    options = BuildOptions(backend="onnxruntime", provider="tensorrt", workspace_mib=512)
    ep = tensorrt_ep_options([profile], options)
    # The caches are not recorded: load_session keys them by the running versions.
    assert ep == {
        "trt_fp16_enable": False,
        "trt_int8_enable": False,
        "trt_profile_min_shapes": "tokens:1x1,lengths:1",
        "trt_profile_opt_shapes": "tokens:8x7,lengths:8",
        "trt_profile_max_shapes": "tokens:8x7,lengths:8",
        "trt_max_workspace_size": 512 << 20,
    }
    assert [p[0] for p in session_providers("tensorrt", ep)] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    with pytest.raises(UserError, match="give one optimization profile"):
        tensorrt_ep_options([profile, profile], options)
