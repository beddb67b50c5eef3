//go:build !unix

// Package bgp is the BGP speaker of ipcluster's Config.BGP, on Unix only:
// here it is empty, and a Config with BGP peers is refused.
package bgp
