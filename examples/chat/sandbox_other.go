//go:build !linux

package main

import (
	"flag"
	"fmt"
	"os"
)

var sandbox = flag.Bool("sandbox", false, "run the example in a throwaway network namespace (Linux only)")

// The sandbox needs Linux network namespaces.
func runSandbox(workers int, port uint) int {
	fmt.Fprintln(os.Stderr, "chat: -sandbox needs Linux network namespaces")
	return 1
}
