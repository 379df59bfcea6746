import json

import pytest

from labkit import cli, env


def test_describe_has_the_facts_records_need():
    info = env.describe()
    for key in ("cpu", "cpu_cores", "device", "gpu", "bf16_supported", "bnb_backend", "ort_providers", "colab",
                "tensorrt", "triton", "vllm", "libraries"):
        assert key in info
    assert info["libraries"]["torch"]
    json.dumps(info)


def test_doctor_json_is_valid_json(capsys):
    assert cli.main(["doctor", "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["python"] == env.describe()["python"]


def test_doctor_table_lists_libraries(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "transformers" in out


def test_quick_mode_reads_env(monkeypatch):
    monkeypatch.setenv("LABKIT_QUICK", "1")
    assert env.quick_mode()
    monkeypatch.setenv("LABKIT_QUICK", "0")
    assert not env.quick_mode()


@pytest.mark.parametrize("colab", [True, False])
@pytest.mark.parametrize("cuda", [True, False])
def test_quick_is_the_default_on_every_runtime(monkeypatch, colab, cuda):
    monkeypatch.delenv("LABKIT_QUICK", raising=False)
    if colab:
        monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    else:
        monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    monkeypatch.setattr(env, "has_cuda", lambda: cuda)
    assert env.quick_mode()
    monkeypatch.setenv("LABKIT_QUICK", "0")
    assert not env.quick_mode()  # full mode only when asked for


def test_library_versions_are_found_under_every_distribution_name(monkeypatch):
    import importlib.metadata

    have = {"onnxruntime-gpu": "1.32.0", "tensorrt-cu12": "10.16.0"}

    def version(dist):
        if dist in have:
            return have[dist]
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert env.lib_version("onnxruntime") == "1.32.0" and env.lib_distribution("onnxruntime") == "onnxruntime-gpu"
    assert env.lib_version("tensorrt") == "10.16.0" and env.lib_distribution("tensorrt") == "tensorrt-cu12"
    assert env.lib_version("vllm") is None


def test_bf16_is_reported_native_only(monkeypatch):
    import torch

    calls = []

    def is_bf16(including_emulation=True):
        calls.append(including_emulation)
        return including_emulation  # a T4: emulated only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16)
    assert env.bf16_supported("cuda") is False and calls == [False]
    assert "emulated" in env.bf16_note("cuda")
    assert env.bf16_supported("cpu") and "CPU" in env.bf16_note("cpu")


@pytest.mark.parametrize("flags, native", [(["avx2", "avx512f"], False), (["avx2", "avx512_bf16"], True),
                                           (["avx2", "amx_bf16", "amx_tile"], True), ([], False)])
def test_auto_dtype_is_bf16_only_where_the_cpu_multiplies_it(monkeypatch, flags, native):
    import torch

    monkeypatch.setattr(env, "cpu_flags", lambda: flags)
    dtype, why = env.auto_dtype("cpu")
    assert env.bf16_native("cpu") is native
    assert dtype == (torch.bfloat16 if native else torch.float32)
    assert ("computes in bfloat16" in why) is native and "dtype='auto'" in why
    assert env.resolve_dtype("auto", "cpu") == dtype


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_on_cuda_follows_native_bf16_not_emulation(monkeypatch, native):
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert env.auto_dtype("cuda")[0] == (torch.bfloat16 if native else torch.float32)  # a T4 keeps fp32


def test_resolve_dtype_takes_names_and_refuses_the_rest():
    import torch

    assert env.resolve_dtype("bf16") == torch.bfloat16 and env.resolve_dtype("float32") == torch.float32
    assert env.resolve_dtype(torch.float16) == torch.float16 and env.dtype_name(torch.bfloat16) == "bfloat16"
    for bad in ("int8", torch.int8, 32, None):
        with pytest.raises(ValueError, match=r"precision=.*is not allowed; use 'auto'"):
            env.resolve_dtype(bad, param="precision")


def test_describe_says_which_dtype_auto_picks_and_why():
    info = env.describe()
    assert info["auto_dtype"] in ("bfloat16", "float32") and "dtype='auto'" in info["auto_dtype_why"]
