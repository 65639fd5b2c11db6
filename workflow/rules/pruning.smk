rule prune:
    """Fine stage: sequential layer-wise pruning at the allocated ratios."""
    input:
        model="results/{model}/model",
        calibration="results/{model}/calibration.safetensors",
        allocation="results/{model}/{method}/{sparsity}/allocation.json",
    output:
        # keep_checkpoints: false deletes each pruned model once its evaluations are done
        model=maybe_temp(directory("results/{model}/{method}/{sparsity}/model")),
        report="results/{model}/{method}/{sparsity}/pruning.json",
    params:
        py=model_python,
        explain=explain_python,
        model=model_args,
        prune=prune_args,
    threads: prune_threads
    resources:
        gpu=GPU,
        mem_mb=estimated("prune", "mem_mb"),
        runtime=estimated("prune", "runtime"),
        gpu_mem_mb=estimated("prune", "gpu_mem_mb"),  # estimate, shown with the job; SLURM has no request for it
    priority: 1  # before evaluations: they then run in pairs of single-threaded jobs (common.smk)
    log:
        "results/{model}/{method}/{sparsity}/logs/prune.log",
    benchmark:
        "results/{model}/{method}/{sparsity}/benchmarks/prune.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        "{params.py} -m ecoflap --threads {threads} prune --model {input.model} --calibration {input.calibration} "
        "--allocation {input.allocation} {params.model} {params.prune} "
        "--out {output.model} --report {output.report} > {log} 2>&1 "
        f"{EXPLAIN_EXIT}"
