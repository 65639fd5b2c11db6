rule evaluate:
    """One vision-language evaluation entry of one row's model: VQA, captioning, retrieval or
    zero-shot classification."""
    input:
        model=model_dir,
    output:
        "results/{model}/{method}/{sparsity}/eval/{task}.json",
    params:
        py=model_python,
        explain=explain_python,
        model=model_args,
        args=eval_args,
        kind=eval_kind,
    threads: THREADS["evaluate"]
    priority: EVALUATION_PRIORITY  # common.smk: frees each temporary checkpoint early
    resources:
        gpu=GPU,
        mem_mb=estimated("evaluate", "mem_mb"),
        runtime=estimated("evaluate", "runtime"),
        gpu_mem_mb=estimated("evaluate", "gpu_mem_mb"),  # estimate, shown with the job; SLURM has no request for it
    log:
        "results/{model}/{method}/{sparsity}/logs/{task}.log",
    benchmark:
        "results/{model}/{method}/{sparsity}/benchmarks/{task}.tsv"
    conda:
        "../../envs/ecoflap.yaml"
    shell:
        "{params.py} -m ecoflap --threads {threads} evaluate --model {input.model} --task {params.kind} "
        "{params.model} {params.args} --out {output} > {log} 2>&1 "
        f"{EXPLAIN_EXIT}"


if TEXT_ENTRIES:

    rule evaluate_text:
        """Every text evaluation of one row's model (perplexity, lm-eval) from one process and one
        model load; each entry still writes its own result file."""
        input:
            model=model_dir,
        output:
            [f"results/{{model}}/{{method}}/{{sparsity}}/eval/{name}.json" for name in TEXT_ENTRIES],
        params:
            py=model_python,
            explain=explain_python,
            model=model_args,
            args=text_eval_args,
            out_dir=lambda wc: f"results/{wc.model}/{wc.method}/{wc.sparsity}/eval",
        threads: THREADS["evaluate"]
        priority: EVALUATION_PRIORITY  # common.smk: frees each temporary checkpoint early
        resources:
            gpu=GPU,
            mem_mb=estimated("evaluate", "mem_mb"),
            runtime=estimated("evaluate", "runtime"),
            gpu_mem_mb=estimated("evaluate", "gpu_mem_mb"),  # estimate, shown with the job; SLURM has no request for it
        log:
            "results/{model}/{method}/{sparsity}/logs/evaluate_text.log",
        benchmark:
            "results/{model}/{method}/{sparsity}/benchmarks/evaluate_text.tsv"
        conda:
            "../../envs/ecoflap.yaml"
        shell:
            "{params.py} -m ecoflap --threads {threads} evaluate-text --model {input.model} {params.model} "
            "{params.args} --out-dir {params.out_dir} > {log} 2>&1 "
            f"{EXPLAIN_EXIT}"
