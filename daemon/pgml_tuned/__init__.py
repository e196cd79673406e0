"""pgml-tuned: fine-tune Hugging Face models from SQL, beside any PostgreSQL."""

__version__ = "0.1.0"
