// Package deploy holds the deployment files the README points to; its test
// checks that the Kubernetes manifests decode strictly into the Kubernetes
// API's own types (no cluster needed), and that they say what the README
// says they do.
package deploy

import (
	"os"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// MetalLB's custom resources, as much of them as the manifests use: its
// Go types live in MetalLB's own module. Strict decoding rejects any
// field not listed here, so a typo still fails.
type (
	ipAddressPool struct {
		metav1.TypeMeta   `json:",inline"`
		metav1.ObjectMeta `json:"metadata"`
		Spec              struct {
			Addresses  []string `json:"addresses"`
			AutoAssign *bool    `json:"autoAssign,omitempty"`
		} `json:"spec"`
	}
	bgpPeer struct {
		metav1.TypeMeta   `json:",inline"`
		metav1.ObjectMeta `json:"metadata"`
		Spec              struct {
			MyASN       uint32          `json:"myASN"`
			PeerASN     uint32          `json:"peerASN"`
			PeerAddress string          `json:"peerAddress"`
			HoldTime    metav1.Duration `json:"holdTime,omitempty"`
		} `json:"spec"`
	}
	bgpAdvertisement struct {
		metav1.TypeMeta   `json:",inline"`
		metav1.ObjectMeta `json:"metadata"`
		Spec              struct {
			IPAddressPools    []string `json:"ipAddressPools"`
			AggregationLength *int32   `json:"aggregationLength,omitempty"`
		} `json:"spec"`
	}
)

// decodeAll decodes every document of a manifest file strictly into the
// type its apiVersion and kind name.
func decodeAll(t *testing.T, file string) []any {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var out []any
	for i, doc := range strings.Split(string(b), "\n---\n") {
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
			t.Fatalf("%s, document %d: %v", file, i+1, err)
		}
		var obj any
		switch tm.APIVersion + " " + tm.Kind {
		case "v1 Pod":
			obj = new(corev1.Pod)
		case "v1 Service":
			obj = new(corev1.Service)
		case "apps/v1 DaemonSet":
			obj = new(appsv1.DaemonSet)
		case "policy/v1 PodDisruptionBudget":
			obj = new(policyv1.PodDisruptionBudget)
		case "networking.k8s.io/v1 NetworkPolicy":
			obj = new(networkingv1.NetworkPolicy)
		case "metallb.io/v1beta1 IPAddressPool":
			obj = new(ipAddressPool)
		case "metallb.io/v1beta2 BGPPeer":
			obj = new(bgpPeer)
		case "metallb.io/v1beta1 BGPAdvertisement":
			obj = new(bgpAdvertisement)
		default:
			t.Fatalf("%s, document %d: unexpected %s %s", file, i+1, tm.APIVersion, tm.Kind)
		}
		if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
			t.Fatalf("%s, document %d (%s): %v", file, i+1, tm.Kind, err)
		}
		out = append(out, obj)
	}
	return out
}

func only[T any](t *testing.T, objs []any) T {
	t.Helper()
	var found []T
	for _, o := range objs {
		if v, ok := o.(T); ok {
			found = append(found, v)
		}
	}
	if len(found) != 1 {
		var zero T
		t.Fatalf("want one %T, found %d", zero, len(found))
	}
	return found[0]
}

func TestPodManifest(t *testing.T) {
	objs := decodeAll(t, "kubernetes-pod.yaml")
	pod := only[*corev1.Pod](t, objs)
	checkContainer(t, pod.Spec.Containers[0], false)
	only[*networkingv1.NetworkPolicy](t, objs)
}

func TestDaemonSetManifest(t *testing.T) {
	objs := decodeAll(t, "kubernetes-daemonset.yaml")
	ds := only[*appsv1.DaemonSet](t, objs)
	if ds.Spec.Template.Spec.HostNetwork {
		t.Error("the DaemonSet's pods must have their own network namespace (the cluster's), not the node's")
	}
	if u := ds.Spec.UpdateStrategy.RollingUpdate; u == nil || u.MaxUnavailable == nil || u.MaxUnavailable.IntValue() != 1 {
		t.Errorf("rolling update: %+v, want one node at a time", ds.Spec.UpdateStrategy)
	}
	checkContainer(t, ds.Spec.Template.Spec.Containers[0], true)
	svc := only[*corev1.Service](t, objs)
	if svc.Spec.Type != corev1.ServiceTypeLoadBalancer || svc.Spec.ExternalTrafficPolicy != corev1.ServiceExternalTrafficPolicyLocal ||
		svc.Spec.SessionAffinity != corev1.ServiceAffinityClientIP {
		t.Errorf("Service: type %s, externalTrafficPolicy %s, sessionAffinity %s; want LoadBalancer, Local (the client's address kept), ClientIP",
			svc.Spec.Type, svc.Spec.ExternalTrafficPolicy, svc.Spec.SessionAffinity)
	}
	pool := only[*ipAddressPool](t, objs)
	adv := only[*bgpAdvertisement](t, objs)
	peer := only[*bgpPeer](t, objs)
	if !slices.Contains(adv.Spec.IPAddressPools, pool.Name) || svc.Annotations["metallb.universe.tf/address-pool"] != pool.Name {
		t.Errorf("the Service's pool %q, the advertisement's %v, the pool %q: they must match", svc.Annotations["metallb.universe.tf/address-pool"], adv.Spec.IPAddressPools, pool.Name)
	}
	if adv.Spec.AggregationLength == nil || *adv.Spec.AggregationLength != 32 || peer.Spec.PeerASN == 0 || peer.Spec.MyASN == 0 {
		t.Errorf("MetalLB: advertisement %+v, peer %+v", adv.Spec, peer.Spec)
	}
	only[*policyv1.PodDisruptionBudget](t, objs)
}

// checkContainer checks what the README promises of the container: the
// master's capabilities and nothing else, its probes on /readyz and
// /healthz, and (drain) a preStop that drains.
func checkContainer(t *testing.T, c corev1.Container, drain bool) {
	t.Helper()
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Add, "NET_ADMIN") || !slices.Contains(sc.Capabilities.Drop, "ALL") {
		t.Errorf("%s: capabilities %+v, want NET_ADMIN added and ALL dropped", c.Name, sc)
	}
	if p := c.ReadinessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/readyz" {
		t.Errorf("%s: readiness probe %+v, want GET /readyz", c.Name, p)
	}
	if p := c.LivenessProbe; p == nil || p.HTTPGet == nil || p.HTTPGet.Path != "/healthz" {
		t.Errorf("%s: liveness probe %+v, want GET /healthz", c.Name, p)
	}
	if drain {
		pre := c.Lifecycle
		if pre == nil || pre.PreStop == nil || pre.PreStop.Exec == nil || !strings.Contains(strings.Join(pre.PreStop.Exec.Command, " "), "ipclusterctl -name echo drain") {
			t.Errorf("%s: preStop %+v, want one that runs ipclusterctl drain", c.Name, pre)
		}
	}
}
