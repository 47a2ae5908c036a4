-- SSM's CreateActivation members fleetrun keeps: the name given to nodes registering with the
-- activation ('' keeps the agent's own), and the IAM role it names (shown back, never used).
ALTER TABLE activations ADD COLUMN default_instance_name TEXT NOT NULL DEFAULT '';
ALTER TABLE activations ADD COLUMN iam_role TEXT NOT NULL DEFAULT '';
