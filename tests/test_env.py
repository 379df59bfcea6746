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
