def scorer_args(wc):
    s = config["scorers"][wc.scorer]
    n = s.get("n_samples", config["calibration"]["n_samples"])
    args = [f"--kind {s['kind']}", f"--n-samples {n}", f"--batch-size {s['batch_size']}"]
    if s["kind"] == "zeroth_order":
        args += [f"--granularity {s['granularity']}", f"--eps {s['eps']}"]
        args += ["--reuse-block-inputs"] if s["reuse_block_inputs"] else []
    elif s["kind"] == "first_order":
        args += [f"--granularity {s['granularity']}", f"--reduce {s['reduce']}"]
    else:
        args += [f"--owl-m {s['m']}"]
    if "seed" in s:
        args.append(f"--seed {s['seed']}")
    return " ".join(args)


rule score:
    """Coarse stage: importance of every block (or layer) on the calibration windows."""
    input:
        model="results/{model}/model",
        calibration="results/{model}/calibration.safetensors",
    output:
        "results/{model}/scores/{scorer}.json",
    params:
        model=model_args,
        scorer=scorer_args,
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=MEM,
    log:
        "results/{model}/scores/logs/{scorer}.log",
    benchmark:
        "results/{model}/scores/benchmarks/{scorer}.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        "{PY} -m ecoflap --threads {threads} score --model {input.model} --calibration {input.calibration} "
        "{params.model} {params.scorer} --out {output} > {log} 2>&1"
