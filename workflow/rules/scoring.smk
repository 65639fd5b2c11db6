rule score:
    """Coarse stage: importance of every block (or layer) on the calibration windows."""
    input:
        model="results/{model}/model",
        calibration="results/{model}/calibration.safetensors",
    output:
        "results/{model}/scores/{scorer}.json",
    params:
        py=model_python,
        explain=explain_python,
        model=model_args,
        scorer=scorer_args,
    threads: scorer_threads
    resources:
        gpu=GPU,
        mem_mb=estimated("score", "mem_mb"),
        runtime=estimated("score", "runtime"),
        gpu_mem_mb=estimated("score", "gpu_mem_mb"),  # estimate, shown with the job; SLURM has no request for it
    priority: 1  # before evaluations: they then run in pairs of single-threaded jobs (common.smk)
    log:
        "results/{model}/scores/logs/{scorer}.log",
    benchmark:
        "results/{model}/scores/benchmarks/{scorer}.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        "{params.py} -m ecoflap --threads {threads} score --model {input.model} --calibration {input.calibration} "
        "{params.model} {params.scorer} --out {output} > {log} 2>&1 "
        f"{EXPLAIN_EXIT}"
