import json

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


def test_a_cpu_only_colab_runtime_is_quick_by_default(monkeypatch):
    monkeypatch.delenv("LABKIT_QUICK", raising=False)
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    monkeypatch.setattr(env, "has_cuda", lambda: False)
    assert env.quick_mode()
    monkeypatch.setattr(env, "has_cuda", lambda: True)
    assert not env.quick_mode()  # a GPU runtime runs the full lesson
    monkeypatch.setenv("LABKIT_QUICK", "0")
    monkeypatch.setattr(env, "has_cuda", lambda: False)
    assert not env.quick_mode()  # asked for explicitly
    monkeypatch.delenv("COLAB_RELEASE_TAG")
    monkeypatch.delenv("LABKIT_QUICK")
    assert not env.quick_mode()  # a laptop without the variable: full mode, as before


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
