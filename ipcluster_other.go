//go:build !linux

package ipcluster

import "context"

// Worker is the handle a worker process's function receives. On platforms
// other than Linux no worker ever runs.
type Worker struct{}

func runWorker(context.Context, *Config, func(*Worker) error) error { return ErrNotSupported }
func runMaster(context.Context, *Config) error                      { return ErrNotSupported }
