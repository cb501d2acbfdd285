-- headerMatches mismatch actions, applied after RBAC allowed the request.
--
-- RBAC's shadow rules name the first HTTP rule that matched the request (dynamic metadata of the RBAC
-- filters, one key per direction); the route's metadata (from RDS, like the policies) maps that rule to its
-- actions: {action, header name, value}. A header whose value already equals the rule's value is left as it is.
local GROUPS = {"egress_", "ingress_"}

function envoy_on_request(handle)
  local actions = handle:metadata():get("actions")
  if actions == nil then
    return
  end
  local rbac = handle:streamInfo():dynamicMetadata():get("envoy.filters.http.rbac")
  if rbac == nil then
    return
  end
  local headers = handle:headers()
  for _, group in ipairs(GROUPS) do
    local rule = rbac[group .. "shadow_effective_policy_id"]
    local list = rule and actions[rule]
    if list ~= nil then
      for _, action in ipairs(list) do
        local kind, name, value = action[1], action[2], action[3]
        if headers:get(name) ~= value then
          if kind == "REPLACE" then
            headers:replace(name, value)
          elseif kind == "ADD" then
            headers:add(name, value)
          elseif kind == "DELETE" then
            headers:remove(name)
          end
        end
      end
    end
  end
end
