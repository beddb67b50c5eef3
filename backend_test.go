//go:build linux

package ipcluster

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/ipcluster/ipcluster/internal/steer"
)

// Auto's choice and its reason, and the errors when nothing can work; the
// namespace tests see only the choices this kernel allows.
func TestChooseBackend(t *testing.T) {
	bpfErr := fmt.Errorf("steer: create the REUSEPORT_SOCKARRAY: %w", steer.ErrPermission)
	nftErr := errors.New("netlink receive: operation not supported")
	iptErr := errors.New("iptables-restore not found")
	noBPF := "auto: bpf unavailable (" + bpfErr.Error() + "); "
	for _, tc := range []struct {
		want                   Backend
		bpfErr, nftErr, iptErr error
		name                   Backend
		config, reason         string
		err                    string
	}{
		{BackendAuto, nil, nil, nil, BackendBPF, "auto", "auto: SK_REUSEPORT programs load here", ""},
		{BackendAuto, nil, nftErr, iptErr, BackendBPF, "auto", "auto: SK_REUSEPORT programs load here", ""},
		{BackendAuto, bpfErr, nil, nil, BackendNFTables, "auto", noBPF + "nf_tables answers", ""},
		{BackendAuto, bpfErr, nil, iptErr, BackendNFTables, "auto", noBPF + "nf_tables answers", ""},
		{BackendAuto, bpfErr, nftErr, nil, BackendIPTables, "auto", noBPF + "nf_tables unavailable: netlink receive: operation not supported", ""},
		{BackendAuto, bpfErr, nftErr, iptErr, "", "", "", "no rule backend: bpf: "},
		{BackendBPF, nil, nftErr, iptErr, BackendBPF, "bpf", "Config.Backend", ""},
		{BackendBPF, bpfErr, nil, nil, "", "", "", "missing privilege: Config.Backend \"bpf\""},
		{BackendNFTables, errNotAsked, nil, iptErr, BackendNFTables, "nftables", "Config.Backend", ""},
		{BackendNFTables, errNotAsked, nftErr, nil, "", "", "", "nf_tables unavailable: netlink receive"},
		{BackendIPTables, errNotAsked, nftErr, nil, BackendIPTables, "iptables", "Config.Backend", ""},
		{BackendIPTables, errNotAsked, nil, iptErr, "", "", "", "iptables-restore not found"},
	} {
		c, err := chooseBackend(tc.want, tc.bpfErr, tc.nftErr, tc.iptErr)
		switch {
		case tc.err != "":
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q, %v, %v, %v: error %v, want one with %q", tc.want, tc.bpfErr, tc.nftErr, tc.iptErr, err, tc.err)
			}
		case err != nil || c.name != tc.name || c.config != tc.config || c.reason != tc.reason:
			t.Errorf("%q, %v, %v, %v: %+v, %v; want %s, %s, %q", tc.want, tc.bpfErr, tc.nftErr, tc.iptErr, c, err, tc.name, tc.config, tc.reason)
		}
	}
	if _, err := chooseBackend(BackendBPF, bpfErr, nil, nil); !errors.Is(err, ErrNoPrivilege) {
		t.Errorf("bpf asked for without CAP_BPF: %v, want ErrNoPrivilege", err)
	}
	if _, err := chooseBackend(BackendNFTables, errNotAsked, nftErr, nil); !errors.Is(err, ErrNoNFTables) || !errors.Is(err, nftErr) {
		t.Errorf("nftables asked for, unavailable: %v, want ErrNoNFTables wrapping the kernel's error", err)
	}
}
