"""Ray adapter of distillprompt: scoring on a pool of actors, cluster connection, job submission."""
