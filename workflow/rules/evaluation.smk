rule evaluate:
    """One evaluation entry of one row's model: perplexity or lm-eval for language models;
    VQA, captioning, retrieval or zero-shot classification for vision-language models."""
    input:
        model=model_dir,
    output:
        "results/{model}/{method}/{sparsity}/eval/{task}.json",
    params:
        py=PY,
        model=model_args,
        args=eval_args,
        kind=eval_kind,
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
        "{params.py} -m ecoflap --threads {threads} evaluate --model {input.model} --task {params.kind} "
        "{params.model} {params.args} --out {output} > {log} 2>&1"
