"""Bad command lines get one clear line on stderr and exit code 2 — never a traceback."""

import pytest

from labkit import cli


@pytest.mark.parametrize("argv,env,words", [
    (["serve", "--port", "70000"], {}, "port=70000 must be an integer in 0..65535"),
    (["serve", "--max-num-seqs", "0"], {}, "max_num_seqs=0 must be a positive integer"),
    (["serve", "--kv-reservation", "half"], {}, "kv_reservation='half'; allowed: 'max_model_len', 'exact'"),
    (["serve", "--no-paged", "--enable-prefix-caching"], {}, "enable_prefix_caching=True needs paged=True"),
    (["serve", "--speculative-config", "{ngram"], {}, "speculative_config='{ngram' is not JSON"),
    (["serve", "--speculative-config", '{"method": "eagle"}'], {}, "method='eagle' is not a speculative method"),
    (["bench-serve", "--prompt-len", "10", "5"], {}, "prompt_len=(10, 5) must be (MIN, MAX)"),
    (["bench-serve", "--num-requests", "0"], {}, "num_requests=0"),
    (["bench-serve", "--out", "/nonexistent-dir/x.json"], {}, "the directory '/nonexistent-dir' does not exist"),
    (["bench-serve", "--url", "http://127.0.0.1:1"], {}, "no OpenAI-compatible server answers"),
    (["run", "baseline", "--quick"], {"LABKIT_DEVICE": "gpu"}, "LABKIT_DEVICE='gpu' is not a device"),
    (["run", "baseline", "--quick"], {"LABKIT_DEVICE": "cuda"}, "no CUDA GPU"),
    (["run", "pruning", "--quick", "--device", "cuda:3"], {},
     "device='cuda:3' but this machine has no CUDA GPU; allowed here: cpu"),
    (["run", "pruning", "--quick", "--device", "tpu"], {}, "device='tpu' is not a device; allowed here: cpu"),
])

def test_one_clear_line_and_exit_2(argv, env, words, capsys, monkeypatch, tmp_path):
    import torch

    if (env.get("LABKIT_DEVICE") == "cuda" or "cuda:3" in argv) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if argv[0] == "run":
        argv = [*argv, "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"labkit {argv[0]}: error:")


def test_serve_offers_every_engine_setting():
    """The CLI's serve options are derived from EngineConfig: a new engine field is a new flag, nothing to edit."""
    from dataclasses import fields

    from labkit.serve.config import EngineConfig

    serve = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "serve")[1]
    dests = {a.dest for a in serve._actions}
    assert {f.name for f in fields(EngineConfig)} <= dests
    args = serve.parse_args(["--block-size", "8", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "2048"])
    assert (args.block_size, args.enable_chunked_prefill, args.paged) == (8, False, True)
    args = serve.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    from labkit.serve.config import EngineConfig

    assert EngineConfig(speculative_config=args.speculative_config).speculative().num_speculative_tokens == 3
