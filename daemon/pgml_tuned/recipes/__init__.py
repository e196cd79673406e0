"""One module (or small package) per task, each with run(ctx): options → data → model → train → store.
Which module runs which task is pgml_tuned.tasks; hf.py holds the Hugging Face plumbing they share."""
