-- A random X-User-ID on every request, so a sticky-hashing proxy hashes a fresh key each time.
-- Seeded, so every run (and every target) sees the same sequence of keys.
math.randomseed(20240601)

request = function()
  return wrk.format(nil, nil, { ["X-User-ID"] = tostring(math.random(1, 100000000)) })
end
