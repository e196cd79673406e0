-- 0023_resources: hyperparams.resources asks for more than one process for a training job: {"gpus": N} runs N
-- ranks, one per GPU (torch.distributed, NCCL), {"procs": N} N ranks on CPUs (gloo); "nodes" (several hosts in one
-- gang) is not supported yet and refused. The worker starts the ranks (pgml_tuned/child/dist.py); rank 0 alone writes
-- the job's logs, checkpoints, files and final commit. The object is checked before anything is queued (0022's jobs
-- trigger, through pgml._check_resources).

UPDATE pgml.tasks SET hyperparams = hyperparams || ARRAY['resources']
WHERE name IN ('text-classification', 'text-pair-classification', 'conversation')
  AND NOT ('resources' = ANY (hyperparams));

-- the diagnostic task runs as several ranks too, and can make one of them crash (recipes/noop.py)
UPDATE pgml.tasks SET hyperparams = hyperparams || ARRAY['resources', 'fail_rank']
WHERE name = 'noop' AND NOT ('fail_rank' = ANY (hyperparams));

INSERT INTO pgml.schema_migrations (version) VALUES ('0023_resources') ON CONFLICT DO NOTHING;
