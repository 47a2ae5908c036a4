-- Session recordings (issue 11): whether a session is recorded (an asciicast object at
-- sessions/{session_id}.cast) and its size once complete. 'recording' while the session runs (the
-- object exists only once its upload completed); start-up turns a 'recording' left by a stopped
-- server into 'failed'.
ALTER TABLE sessions ADD COLUMN recording TEXT NOT NULL DEFAULT 'none'; -- none, recording, complete, failed
ALTER TABLE sessions ADD COLUMN recording_bytes INTEGER NOT NULL DEFAULT 0;
