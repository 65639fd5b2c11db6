rule evaluate:
    """Perplexity on held-out text, or lm-eval multiple-choice tasks, of one row's model."""
    input:
        model=model_dir,
    output:
        "results/{model}/{method}/{sparsity}/eval/{task}.json",
    params:
        py=PY,
        model=model_args,
        args=eval_args,
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=MEM,
    log:
        "results/{model}/{method}/{sparsity}/logs/{task}.log",
    benchmark:
        "results/{model}/{method}/{sparsity}/benchmarks/{task}.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        "{params.py} -m ecoflap --threads {threads} evaluate --model {input.model} --task {wildcards.task} "
        "{params.model} {params.args} --out {output} > {log} 2>&1"
