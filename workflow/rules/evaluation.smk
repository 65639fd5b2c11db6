def eval_args(wc):
    e = config["evaluation"][wc.task]
    if wc.task == "perplexity":
        args = [f"--dataset {e['dataset']}", f"--seq-len {e['seq_len']}", f"--batch-size {e['batch_size']}"]
        if e.get("max_windows"):
            args.append(f"--max-windows {e['max_windows']}")
    else:
        args = ["--tasks " + " ".join(e["tasks"]), f"--num-fewshot {e['num_fewshot']}",
                f"--batch-size {e['batch_size']}"]
        if e.get("limit"):
            args.append(f"--limit {e['limit']}")
    return " ".join(args)


rule evaluate:
    """Perplexity on held-out text, or lm-eval multiple-choice tasks, of one row's model."""
    input:
        model=model_dir,
    output:
        "results/{model}/{method}/{sparsity}/eval/{task}.json",
    params:
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
        "{PY} -m ecoflap --threads {threads} evaluate --model {input.model} --task {wildcards.task} "
        "{params.model} {params.args} --out {output} > {log} 2>&1"
