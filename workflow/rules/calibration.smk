rule calibration:
    """Seeded calibration samples, built once per model: token windows (C4 or the embedded
    Austen text), or image-caption pairs (CC3M, COCO) through the family's adapter."""
    input:
        model="results/{model}/model",
    output:
        windows="results/{model}/calibration.safetensors",
        meta="results/{model}/calibration.safetensors.json",
    params:
        py=model_python,
        explain=explain_python,
        args=calibration_args,
    # one core: a two-core reservation would wait for both cores to free up, leaving one idle
    # for the length of a single-threaded job (common.smk)
    threads: 1
    priority: 1  # before evaluations: they then run in pairs of single-threaded jobs (common.smk)
    log:
        "results/{model}/logs/calibration.log",
    benchmark:
        "results/{model}/benchmarks/calibration.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        "{params.py} -m ecoflap calibrate --model {input.model} {params.args} --out {output.windows} > {log} 2>&1 "
        f"{EXPLAIN_EXIT}"
