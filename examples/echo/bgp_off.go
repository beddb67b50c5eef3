//go:build ipcluster_nobgp

package main

// Built with -tags ipcluster_nobgp (as bench/core does, to measure what a
// program without BGP pays): no BGP speaker linked, no -bgp-* flags.

import "github.com/ipcluster/ipcluster"

func bgpFlags() func(*ipcluster.Config) error {
	return func(*ipcluster.Config) error { return nil }
}
