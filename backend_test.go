//go:build linux

package ipcluster

import (
	"errors"
	"strings"
	"testing"
)

// Auto's choice and its reason, and the errors when nothing can work; the
// namespace tests see only the choices this kernel allows.
func TestChooseBackend(t *testing.T) {
	nftErr := errors.New("netlink receive: operation not supported")
	iptErr := errors.New("iptables-restore not found")
	for _, tc := range []struct {
		want           Backend
		nftErr, iptErr error
		name           Backend
		config, reason string
		err            string
	}{
		{BackendAuto, nil, nil, BackendNFTables, "auto", "auto: nf_tables answers", ""},
		{BackendAuto, nil, iptErr, BackendNFTables, "auto", "auto: nf_tables answers", ""},
		{BackendAuto, nftErr, nil, BackendIPTables, "auto", "auto: nf_tables unavailable: netlink receive: operation not supported", ""},
		{BackendAuto, nftErr, iptErr, "", "", "", "no rule backend: nf_tables: netlink receive"},
		{BackendNFTables, nil, iptErr, BackendNFTables, "nftables", "Config.Backend", ""},
		{BackendNFTables, nftErr, nil, "", "", "", "nf_tables unavailable: netlink receive"},
		{BackendIPTables, nftErr, nil, BackendIPTables, "iptables", "Config.Backend", ""},
		{BackendIPTables, nil, iptErr, "", "", "", "iptables-restore not found"},
	} {
		c, err := chooseBackend(tc.want, tc.nftErr, tc.iptErr)
		switch {
		case tc.err != "":
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q, %v, %v: error %v, want one with %q", tc.want, tc.nftErr, tc.iptErr, err, tc.err)
			}
		case err != nil || c.name != tc.name || c.config != tc.config || c.reason != tc.reason:
			t.Errorf("%q, %v, %v: %+v, %v; want %s, %s, %q", tc.want, tc.nftErr, tc.iptErr, c, err, tc.name, tc.config, tc.reason)
		}
	}
	if _, err := chooseBackend(BackendNFTables, nftErr, nil); !errors.Is(err, ErrNoNFTables) || !errors.Is(err, nftErr) {
		t.Errorf("nftables asked for, unavailable: %v, want ErrNoNFTables wrapping the kernel's error", err)
	}
}
