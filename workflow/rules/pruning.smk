def prune_args(wc):
    p = config["pruning"]
    _target, nm = parse_label(wc.sparsity)
    n = p.get("n_samples", config["calibration"]["n_samples"])
    args = [f"--pruner {method(wc)['pruner']}", f"--n-samples {n}", f"--batch-size {p['batch_size']}",
            f"--sparsegpt-damp {p['sparsegpt_damp']}", f"--sparsegpt-block-size {p['sparsegpt_block_size']}"]
    if nm:
        args.append(f"--nm {nm}")
    return " ".join(args)


rule prune:
    """Fine stage: sequential layer-wise pruning at the allocated ratios."""
    input:
        model="results/{model}/model",
        calibration="results/{model}/calibration.safetensors",
        allocation="results/{model}/{method}/{sparsity}/allocation.json",
    output:
        model=directory("results/{model}/{method}/{sparsity}/model"),
        report="results/{model}/{method}/{sparsity}/pruning.json",
    params:
        model=model_args,
        prune=prune_args,
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=MEM,
    log:
        "results/{model}/{method}/{sparsity}/logs/prune.log",
    benchmark:
        "results/{model}/{method}/{sparsity}/benchmarks/prune.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        "{PY} -m ecoflap --threads {threads} prune --model {input.model} --calibration {input.calibration} "
        "--allocation {input.allocation} {params.model} {params.prune} "
        "--out {output.model} --report {output.report} > {log} 2>&1"
